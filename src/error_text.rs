//! One line for an error and its sources (`outer: inner: cause`), for log lines and the detail fields users see.
//!
//! Every layer renders error chains this way (signed API calls, the store, the FUSE adapter's log line, rekey's
//! report); one function keeps them alike. Libraries such as object_store often repeat the inner message in the
//! outer one, so a source whose text is already present is skipped.

/// `e` and each of its sources, joined by `: `, skipping sources whose text is already in the line. Print an
/// `anyhow::Error` with `error_chain(&*e)` rather than `{e:#}`, which repeats every cause an outer message quotes
/// (a key file error used to show its OS error twice).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn sources_are_joined_and_repeats_skipped() {
        let e = E("upload failed: timed out", Some(Box::new(E("timed out", Some(Box::new(E("connection reset", None)))))));
        assert_eq!(error_chain(&e), "upload failed: timed out: connection reset");
    }
}
