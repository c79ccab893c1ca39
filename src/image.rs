//! The part of an OCI image configuration that perfbox honours when it runs a job: what the
//! `buildkit` module extracts from a build and the `sandbox` module turns into a process.
//! Field names follow the OCI image spec's `config` object (`Entrypoint`, `Cmd`, ...).

use serde::{Deserialize, Serialize};

/// `config` of an OCI image configuration (the subset perfbox uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `ENTRYPOINT`, exec form (the shell form arrives as `["/bin/sh", "-c", "..."]`).
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`, exec form (the shell form arrives as `["/bin/sh", "-c", "..."]`).
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `ENV` as `KEY=value` strings.
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// `WORKDIR`; empty means `/`.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// `USER`: `name`, `uid`, `name:group` or `uid:gid`; empty means root.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The whole OCI image configuration document, as BuildKit returns it (`containerimage.config`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfigFile {
    /// The runtime part of the configuration.
    #[serde(default)]
    pub config: ImageConfig,
}

impl ImageConfig {
    /// Parse BuildKit's `containerimage.config` JSON (the whole image config document).
    pub fn from_image_config_json(bytes: &[u8]) -> serde_json::Result<Self> {
        Ok(serde_json::from_slice::<ImageConfigFile>(bytes)?.config)
    }

    /// The argv the image asks for: Entrypoint followed by Cmd (Docker's rule).
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildkit_config_and_joins_entrypoint_and_cmd() {
        let json = br#"{"architecture":"amd64","config":{"Env":["PATH=/bin"],
            "Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"WorkingDir":"/w","User":"1000"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_image_config_json(json).unwrap();
        assert_eq!(c.argv(), vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.user.as_deref(), Some("1000"));
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
    }
}
