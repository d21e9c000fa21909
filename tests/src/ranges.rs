//! Ranged reads ([`Destination::open_range`]) checked against the bytes a
//! file holds, the same way on every destination: single ranges at the
//! file's edges and across the destination's own request or part
//! boundaries, many at once, and ranges past the end.

use etcd_backup_agent::store::destination::{
    read_ranges, ByteRange, Destination, DestinationError,
};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;

/// Deterministic bytes that differ from neighbour to neighbour and from
/// block to block.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect()
}

/// Reads `len` bytes at `offset` of `path` through `dest`.
pub async fn read_range(dest: &dyn Destination, path: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    dest.open_range(path, offset, len)
        .await
        .unwrap_or_else(|e| panic!("open_range({path}, {offset}, {len}): {e}"))
        .read_to_end(&mut out)
        .await
        .unwrap_or_else(|e| panic!("reading {path} {offset}+{len}: {e}"));
    out
}

/// Asserts that ranged reads of `path` (holding `data`) through `dest`
/// return exactly the bytes asked for: the first byte, the last, the whole
/// file, zero bytes, ranges across each of `boundaries` (where the
/// destination splits requests or parts), eight ranges opened at once and
/// read in reverse order, and [`read_ranges`] with eight in flight; and
/// that ranges past the end fail, naming the file and its size.
pub async fn assert_ranged_reads(
    dest: &dyn Destination,
    path: &str,
    data: &[u8],
    boundaries: &[u64],
) {
    let size = data.len() as u64;
    let slice = |offset: u64, len: u64| &data[offset as usize..(offset + len) as usize];
    let mut ranges: Vec<(u64, u64)> = vec![(0, 1), (size - 1, 1), (0, size), (5, 0), (size, 0)];
    for &b in boundaries {
        assert!(b > 1000 && b + 1000 < size, "boundary {b} of {size}");
        ranges.extend([(b - 1, 2), (b - 1000, 2000), (b, 1), (b - 1, 1)]);
    }
    for &(offset, len) in &ranges {
        let got = read_range(dest, path, offset, len).await;
        assert_eq!(got.len() as u64, len, "{offset}+{len}");
        assert!(got == slice(offset, len), "{offset}+{len}: other bytes");
    }

    // Eight readers open at once, read last one first: none waits for the
    // others to finish, none mixes up another's bytes.
    let eight: Vec<(u64, u64)> = (0..8u64)
        .map(|i| (i * size / 9 + i * 37, 3000 + i * (size / 80)))
        .collect();
    let mut readers = Vec::new();
    for &(offset, len) in &eight {
        readers.push(dest.open_range(path, offset, len).await.unwrap());
    }
    for (r, &(offset, len)) in readers.iter_mut().zip(&eight).rev() {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert!(got == slice(offset, len), "at once: {offset}+{len}");
    }
    drop(readers);

    // Every range so far, eight in flight, in the order asked.
    let asked = ranges.iter().chain(&eight).map(|&(offset, len)| ByteRange {
        path: path.to_string(),
        offset,
        len,
    });
    let got: Vec<Result<Vec<u8>, DestinationError>> = read_ranges(dest, asked, 8).collect().await;
    for (r, &(offset, len)) in got.iter().zip(ranges.iter().chain(&eight)) {
        let bytes = r
            .as_ref()
            .unwrap_or_else(|e| panic!("read_ranges {offset}+{len}: {e}"));
        assert!(bytes == slice(offset, len), "read_ranges: {offset}+{len}");
    }
    assert_eq!(got.len(), ranges.len() + eight.len());

    for (offset, len) in [(size - 1, 2), (0, size + 1), (size + 10, 1), (size + 1, 0)] {
        let e = match dest.open_range(path, offset, len).await {
            Err(e) => e,
            Ok(mut r) => {
                let mut got = Vec::new();
                let read = r.read_to_end(&mut got).await;
                panic!("{offset}+{len} past the end of {size} bytes opened; read {read:?}");
            }
        };
        assert!(
            matches!(e, DestinationError::OutOfRange { size: s, .. } if s == size),
            "{offset}+{len}: {e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("holds only {size} bytes")) && text.contains(path),
            "{text}"
        );
        assert!(!e.is_transient(), "{e:?}");
    }
    let missing = format!("{path}.missing");
    match dest.open_range(&missing, 0, 1).await {
        Err(DestinationError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("a missing file: {e:?}"),
        Ok(_) => panic!("a missing file was opened"),
    }
}
