//! Container ids arrive from runtimes (`CNI_CONTAINERID`) and from HTTP paths, and end up
//! as interface aliases, map keys in the state file and URL path segments.

/// Longest container id accepted, in bytes: the kernel's interface alias limit (IFALIASZ
/// is 256 including the terminating zero) minus one, so the id always fits as the host
/// veth's alias.
pub const MAX_CONTAINER_ID_LEN: usize = 255;

/// A validated container id: 1 to [`MAX_CONTAINER_ID_LEN`] bytes of ASCII letters,
/// digits and `_ . - :`. That is the CNI spec's rule for `CNI_CONTAINERID` plus `:`, which
/// Weave's own reserved ids use (`weave:expose`). Runtimes use hex ids; nothing else needs
/// escaping in a URL path or a file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

/// Why a string is not a container id; the text is fit for an error answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid container id {shown:?}: {reason}")]
pub struct BadContainerId {
    /// The offending id, cut to a length fit for a log line.
    pub shown: String,
    pub reason: &'static str,
}

impl ContainerId {
    pub fn parse(id: &str) -> Result<ContainerId, BadContainerId> {
        let bad = |reason| BadContainerId {
            shown: id.chars().take(80).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(bad("it is empty"));
        }
        if id.len() > MAX_CONTAINER_ID_LEN {
            return Err(bad("it is longer than 255 bytes"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
        {
            return Err(bad(
                "only ASCII letters, digits and the characters _ . - : are allowed",
            ));
        }
        Ok(ContainerId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for ContainerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ContainerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runtime_and_weave_ids() {
        for id in [
            "abc-1.2_3",
            "weave:expose",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            &"a".repeat(MAX_CONTAINER_ID_LEN),
        ] {
            assert_eq!(ContainerId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_what_cannot_be_a_path_segment_alias_or_key() {
        for id in [
            "",
            "a/b",
            "a b",
            "a\nb",
            "a%2Fb",
            "ü",
            "a?b",
            &"a".repeat(MAX_CONTAINER_ID_LEN + 1),
        ] {
            let e = ContainerId::parse(id).unwrap_err();
            assert!(e.to_string().starts_with("invalid container id"), "{e}");
        }
    }
}
