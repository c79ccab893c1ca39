//! The LLB `Definition` that carries the Dockerfile to the `dockerfile.v0` frontend, and the
//! validator every Definition passes before it is sent.
//!
//! The Dockerfile reaches the frontend as a `frontend_inputs` entry holding a two-op LLB graph: a
//! FileOp that `mkfile`s `/Dockerfile` on scratch, and the terminal op pointing at it. We do this
//! instead of exposing a FileSync (`--local dockerfile=DIR`) service on the session because:
//! * no client-side directory is ever exposed to the daemon (it cannot ask for other paths);
//! * there is nothing to sync: the bytes are in memory and travel inside the request;
//! * it works unchanged with a remote `tcp://` daemon that shares no filesystem with us.
//!
//! A submission that brings a build context is the one exception: its unpacked files are served
//! through the build's own session as the local source `context` (see
//! `session::filesync`), and only that directory, under only that name.
//!
//! buildkitd v0.13.2 dereferences op inputs without checking them and *crashes* (nil pointer in
//! `DefinitionOp.Inputs`) on a Definition whose input digests do not match its ops, or whose last
//! op is not a terminal op with one input. [`validate`] checks exactly those invariants.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use sha2::{Digest, Sha256};

use super::proto::pb;

/// Path the Dockerfile is written to inside the input (the frontend's default filename).
pub(crate) const DOCKERFILE_PATH: &str = "/Dockerfile";

/// Status name shown for the mkfile vertex (same label buildctl uses).
const VERTEX_NAME: &str = "[internal] load build definition";

/// Why a Definition was refused before being sent to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// The definition has no ops.
    #[error("definition has no ops")]
    Empty,
    /// An op is not a valid protobuf `pb.Op`.
    #[error("op {index} does not decode as pb.Op: {message}")]
    Undecodable {
        /// Position of the op in `def`.
        index: usize,
        /// Decoder message.
        message: String,
    },
    /// The last op is not a terminal op (no payload, exactly one input).
    #[error(
        "last op must be a terminal op with exactly one input (has {inputs} inputs, payload: {has_payload})"
    )]
    BadTerminal {
        /// Number of inputs of the last op.
        inputs: usize,
        /// Whether the last op carries an operation (a terminal op has none).
        has_payload: bool,
    },
    /// Only the last op may be a terminal op.
    #[error("op {index} is a terminal op but is not last")]
    TerminalNotLast {
        /// Position of the misplaced op.
        index: usize,
    },
    /// An input digest is not `sha256:<hex>` of one of the ops.
    #[error("op {index} has input {digest:?} which is not the digest of any op in the definition")]
    DanglingInput {
        /// Position of the op with the bad input.
        index: usize,
        /// The offending digest.
        digest: String,
    },
    /// An input refers to a negative output index.
    #[error("op {index} has an input with negative output index {output}")]
    BadOutputIndex {
        /// Position of the op.
        index: usize,
        /// The output index.
        output: i64,
    },
    /// The metadata map lacks an op digest (the daemon rejects or mishandles that).
    #[error("metadata has no entry for op digest {digest}")]
    MissingMetadata {
        /// Digest without metadata.
        digest: String,
    },
    /// The metadata map has a key that is no op's digest.
    #[error("metadata key {digest:?} is not the digest of any op")]
    StrayMetadata {
        /// The stray key.
        digest: String,
    },
}

/// `sha256:<lowercase hex>` of the exact marshalled op bytes: how LLB names an op.
pub(crate) fn op_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A validated Definition whose single output is scratch plus `/Dockerfile` with `dockerfile`.
pub(crate) fn dockerfile_definition(dockerfile: &[u8]) -> Result<pb::Definition, DefinitionError> {
    let mkfile = pb::Op {
        inputs: Vec::new(),
        platform: None,
        constraints: None,
        op: Some(pb::op::Op::File(pb::FileOp {
            actions: vec![pb::FileAction {
                // -1 = scratch / no secondary input, as Go's llb writes it.
                input: -1,
                secondary_input: -1,
                output: 0,
                action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                    path: DOCKERFILE_PATH.to_owned(),
                    mode: 0o644,
                    data: dockerfile.to_vec(),
                    owner: None,
                    // -1 = keep the default timestamp (no override).
                    timestamp: -1,
                })),
            }],
        })),
    };
    let mkfile_bytes = mkfile.encode_to_vec();
    let mkfile_digest = op_digest(&mkfile_bytes);

    let terminal = pb::Op {
        inputs: vec![pb::Input {
            digest: mkfile_digest.clone(),
            index: 0,
        }],
        ..Default::default()
    };
    let terminal_bytes = terminal.encode_to_vec();
    let terminal_digest = op_digest(&terminal_bytes);

    let mut metadata = BTreeMap::new();
    metadata.insert(
        mkfile_digest,
        pb::OpMetadata {
            description: BTreeMap::from([("llb.customname".to_owned(), VERTEX_NAME.to_owned())]),
            caps: BTreeMap::from([("file.base".to_owned(), true)]),
            ..Default::default()
        },
    );
    metadata.insert(
        terminal_digest,
        pb::OpMetadata {
            caps: BTreeMap::from([
                ("constraints".to_owned(), true),
                ("platform".to_owned(), true),
            ]),
            ..Default::default()
        },
    );

    let def = pb::Definition {
        def: vec![mkfile_bytes, terminal_bytes],
        metadata,
        source: None,
    };
    validate(&def)?;
    Ok(def)
}

/// Check the invariants buildkitd v0.13.2 relies on without checking them itself.
pub(crate) fn validate(def: &pb::Definition) -> Result<(), DefinitionError> {
    if def.def.is_empty() {
        return Err(DefinitionError::Empty);
    }
    let digests: Vec<String> = def.def.iter().map(|b| op_digest(b)).collect();
    let known: BTreeSet<&str> = digests.iter().map(String::as_str).collect();
    let decode = |index: usize, bytes: &[u8]| {
        pb::Op::decode(bytes).map_err(|e| DefinitionError::Undecodable {
            index,
            message: e.to_string(),
        })
    };
    let last = def.def.len() - 1;

    // The daemon takes the last op as the head and reads its `inputs[0]` unchecked.
    let head = decode(last, &def.def[last])?;
    if head.op.is_some() || head.inputs.len() != 1 {
        return Err(DefinitionError::BadTerminal {
            inputs: head.inputs.len(),
            has_payload: head.op.is_some(),
        });
    }

    for (index, bytes) in def.def.iter().enumerate() {
        let op = decode(index, bytes)?;
        if index != last && op.op.is_none() {
            return Err(DefinitionError::TerminalNotLast { index });
        }
        for input in &op.inputs {
            if !known.contains(input.digest.as_str()) {
                return Err(DefinitionError::DanglingInput {
                    index,
                    digest: input.digest.clone(),
                });
            }
            if input.index < 0 {
                return Err(DefinitionError::BadOutputIndex {
                    index,
                    output: input.index,
                });
            }
        }
    }

    for digest in &digests {
        if !def.metadata.contains_key(digest) {
            return Err(DefinitionError::MissingMetadata {
                digest: digest.clone(),
            });
        }
    }
    if let Some(stray) = def.metadata.keys().find(|k| !known.contains(k.as_str())) {
        return Err(DefinitionError::StrayMetadata {
            digest: stray.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKERFILE: &[u8] = b"FROM busybox\nRUN echo built > /built\nCMD [\"cat\",\"/built\"]\n";

    fn ops(def: &pb::Definition) -> Vec<pb::Op> {
        def.def
            .iter()
            .map(|b| pb::Op::decode(b.as_slice()).expect("op decodes"))
            .collect()
    }

    /// Rebuild a definition from ops (recomputing metadata keys) so a test can break one thing.
    fn from_ops(ops: &[pb::Op]) -> pb::Definition {
        let def: Vec<Vec<u8>> = ops.iter().map(|o| o.encode_to_vec()).collect();
        let metadata = def
            .iter()
            .map(|b| (op_digest(b), pb::OpMetadata::default()))
            .collect();
        pb::Definition {
            def,
            metadata,
            source: None,
        }
    }

    #[test]
    fn mkfile_op_has_go_llb_wire_layout() {
        let def = dockerfile_definition(DOCKERFILE).expect("valid");
        let a = &def.def[0];
        // 22 <len> 12 <len> 08 ff×9 01 10 ff×9 01 2a <len> 0a 0b "/Dockerfile" 10 a4 03 1a <len> <data> 28 ff×9 01
        assert_eq!(a[0], 0x22, "field 4 (file op)");
        assert_eq!(a[2], 0x12, "FileOp.actions");
        assert_eq!(
            &a[4..15],
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
        assert_eq!(
            &a[15..26],
            &[
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
        assert_eq!(a[26], 0x2a, "mkfile action");
        assert_eq!(&a[28..30], &[0x0a, 0x0b]);
        assert_eq!(&a[30..41], b"/Dockerfile");
        assert_eq!(&a[41..44], &[0x10, 0xa4, 0x03], "mode 0644");
        assert_eq!(a[44], 0x1a);
        assert_eq!(a[45] as usize, DOCKERFILE.len());
        assert_eq!(&a[46..46 + DOCKERFILE.len()], DOCKERFILE);
        assert_eq!(a[46 + DOCKERFILE.len()], 0x28, "timestamp -1");
        assert_eq!(a.len(), 46 + DOCKERFILE.len() + 11);

        // Terminal op: 0a 49 0a 47 "sha256:<64 hex>", 75 bytes.
        let b = &def.def[1];
        assert_eq!(b.len(), 75);
        assert_eq!(&b[..4], &[0x0a, 0x49, 0x0a, 0x47]);
        assert_eq!(&b[4..], op_digest(a).as_bytes());
    }

    #[test]
    fn digest_is_sha256_of_exact_bytes() {
        assert_eq!(
            op_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let def = dockerfile_definition(b"FROM busybox\n").expect("valid");
        assert!(def.metadata.contains_key(&op_digest(&def.def[0])));
        assert!(def.metadata.contains_key(&op_digest(&def.def[1])));
        assert_eq!(
            def.metadata[&op_digest(&def.def[0])].description["llb.customname"],
            VERTEX_NAME
        );
    }

    #[test]
    fn same_dockerfile_same_digests() {
        let a = dockerfile_definition(DOCKERFILE).expect("valid");
        let b = dockerfile_definition(DOCKERFILE).expect("valid");
        assert_eq!(a, b);
        let c = dockerfile_definition(b"FROM alpine\n").expect("valid");
        assert_ne!(a.def[0], c.def[0]);
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(
            validate(&pb::Definition::default()),
            Err(DefinitionError::Empty)
        );
    }

    #[test]
    fn rejects_digest_without_sha256_prefix() {
        // The exact case that crashed buildkitd v0.13.2.
        let mut o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        let hex_only = o[1].inputs[0]
            .digest
            .trim_start_matches("sha256:")
            .to_owned();
        o[1].inputs[0].digest = hex_only.clone();
        assert_eq!(
            validate(&from_ops(&o)),
            Err(DefinitionError::DanglingInput {
                index: 1,
                digest: hex_only
            })
        );
    }

    #[test]
    fn rejects_digest_of_other_bytes() {
        let mut o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        o[1].inputs[0].digest = op_digest(b"something else");
        assert!(matches!(
            validate(&from_ops(&o)),
            Err(DefinitionError::DanglingInput { index: 1, .. })
        ));
    }

    #[test]
    fn rejects_terminal_without_inputs() {
        let mut o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        o[1].inputs.clear();
        assert_eq!(
            validate(&from_ops(&o)),
            Err(DefinitionError::BadTerminal {
                inputs: 0,
                has_payload: false
            })
        );
    }

    #[test]
    fn rejects_terminal_with_two_inputs() {
        let mut o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        let dup = o[1].inputs[0].clone();
        o[1].inputs.push(dup);
        assert!(matches!(
            validate(&from_ops(&o)),
            Err(DefinitionError::BadTerminal { inputs: 2, .. })
        ));
    }

    #[test]
    fn rejects_file_op_last() {
        let o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        let swapped = vec![o[1].clone(), o[0].clone()];
        assert!(matches!(
            validate(&from_ops(&swapped)),
            Err(DefinitionError::BadTerminal {
                has_payload: true,
                ..
            })
        ));
        let only_file = vec![o[0].clone()];
        assert!(matches!(
            validate(&from_ops(&only_file)),
            Err(DefinitionError::BadTerminal { .. })
        ));
    }

    #[test]
    fn rejects_terminal_in_the_middle() {
        let o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        let twice = vec![o[0].clone(), o[1].clone(), o[1].clone()];
        assert_eq!(
            validate(&from_ops(&twice)),
            Err(DefinitionError::TerminalNotLast { index: 1 })
        );
    }

    #[test]
    fn rejects_negative_output_index() {
        let mut o = ops(&dockerfile_definition(DOCKERFILE).expect("valid"));
        o[1].inputs[0].index = -1;
        assert!(matches!(
            validate(&from_ops(&o)),
            Err(DefinitionError::BadOutputIndex { output: -1, .. })
        ));
    }

    #[test]
    fn rejects_missing_and_stray_metadata() {
        let good = dockerfile_definition(DOCKERFILE).expect("valid");

        let mut empty = good.clone();
        empty.metadata.clear();
        assert!(matches!(
            validate(&empty),
            Err(DefinitionError::MissingMetadata { .. })
        ));

        let mut missing_head = good.clone();
        let head = op_digest(&good.def[0]);
        missing_head.metadata.remove(&head);
        assert_eq!(
            validate(&missing_head),
            Err(DefinitionError::MissingMetadata { digest: head })
        );

        let mut stray = good;
        stray
            .metadata
            .insert("sha256:00".to_owned(), pb::OpMetadata::default());
        assert!(matches!(
            validate(&stray),
            Err(DefinitionError::StrayMetadata { .. })
        ));
    }

    #[test]
    fn rejects_garbage_bytes() {
        let mut def = dockerfile_definition(DOCKERFILE).expect("valid");
        def.def[0] = vec![0xff, 0xff, 0xff];
        assert!(matches!(
            validate(&def),
            Err(DefinitionError::Undecodable { index: 0, .. })
        ));
    }
}
