//! `verify`: a stored set streamed back and checked against its manifest.

use std::process::ExitCode;

use crate::config::Config;
use crate::store::verify;

use super::{
    fail, find, identities, note_compression, note_encryption, open, print_reports, IdentityArgs,
    Progress,
};
use crate::commands::EXIT_FAILURE;

/// `verify`.
pub async fn verify(
    config: &Config,
    node: &str,
    wanted: &str,
    full: bool,
    id: &IdentityArgs,
) -> ExitCode {
    let ids = match identities(config, id) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let dest = match open(config).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let set = match find(config, dest.as_ref(), node, wanted).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    println!("verifying {}/{}", dest.describe(), set.id.dir());
    note_encryption(
        &set,
        ids.as_ref(),
        "checking the stored ciphertext only (pass --identity FILE to also decrypt and check the plaintext)",
    );
    note_compression(&set, ids.as_ref());
    let progress = Progress::new();
    let result = verify::verify_set(dest.as_ref(), &set, ids.as_ref(), full, &|n, d, t| {
        progress.update(n, d, t)
    })
    .await;
    progress.finish();
    match result {
        Ok(reports) => {
            if print_reports(&reports) {
                println!("set {} is intact", set.id.dir());
                ExitCode::SUCCESS
            } else {
                eprintln!("error: set {} does not match its manifest", set.id.dir());
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => fail(e),
    }
}
