//! The config loader on arbitrary text: no panic, and every problem of a
//! file that parses as TOML starts with the dotted key it concerns.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pyipcd::config::{ConfigError, from_str_with_env};

/// The tables a key starts with.
const TOP: &[&str] = &["log", "daemon", "python", "tcp", "shm", "admin"];

/// `key`, `key[3]`, `a.b[0].c`, `"odd key".x`: a dotted path as the problems
/// write it, starting at a known table (or naming an unknown one), then `:`
/// or a space.
fn starts_with_a_key(line: &str) -> bool {
    let first = line
        .split(|c: char| c == '.' || c == '[' || c == ':' || c == ' ')
        .next()
        .unwrap_or_default();
    if !TOP.contains(&first) && !line.contains(": unknown table") {
        return false;
    }
    let mut rest = line;
    let mut segments = 0;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            // A Rust-debug-quoted key: up to the closing unescaped quote.
            let mut escaped = false;
            let Some(end) = quoted.char_indices().find_map(|(i, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close.then_some(i)
            }) else {
                return false;
            };
            rest = &quoted[end + 1..];
        } else {
            let n = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(rest.len());
            if n == 0 {
                return false;
            }
            rest = &rest[n..];
        }
        segments += 1;
        while let Some(index) = rest.strip_prefix('[') {
            let Some(end) = index.find(']') else {
                return false;
            };
            if index[..end].parse::<usize>().is_err() {
                return false;
            }
            rest = &index[end + 1..];
        }
        match rest.strip_prefix('.') {
            Some(r) => rest = r,
            None => break,
        }
    }
    segments > 0 && (rest.starts_with(':') || rest.starts_with(' '))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/nonexistent/pyipcd-fuzz/pyipcd.toml");
    if let Err(ConfigError::Invalid { problems, .. }) =
        from_str_with_env(&text, path, Some(BTreeMap::new()))
    {
        assert!(!problems.is_empty());
        for p in &problems {
            assert!(
                starts_with_a_key(p)
                    || p.starts_with("(the checks across roles")
                    || p == "the file is not a TOML table",
                "a problem without its key: {p:?}"
            );
        }
    }
});
