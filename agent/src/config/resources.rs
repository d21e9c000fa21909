//! `resources:` validated: the static-pod layout and its root.

use super::*;

impl Validator {
    pub(super) fn resources(&mut self, raw: RawResources) -> Option<ResourcesConfig> {
        let layout = match raw.layout.as_deref() {
            None | Some("openshift") => Layout::Openshift,
            Some("kubeadm") => Layout::Kubeadm,
            Some("none") => Layout::None,
            Some(other) => {
                self.error(
                    "resources.layout",
                    format!("unknown layout {other:?}; expected one of openshift, kubeadm, none"),
                );
                return None;
            }
        };
        let root = raw
            .root
            .unwrap_or_else(|| PathBuf::from(defaults::RESOURCES_ROOT));
        if layout != Layout::None {
            match std::fs::metadata(&root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    self.error(
                        "resources.root",
                        format!("{} is not a directory", root.display()),
                    );
                    return None;
                }
                Err(e) => {
                    self.error(
                        "resources.root",
                        format!(
                            "cannot read {}: {e}; mount the host's /etc/kubernetes there, or set resources.layout: none",
                            root.display()
                        ),
                    );
                    return None;
                }
            }
        }
        Some(ResourcesConfig { layout, root })
    }
}
