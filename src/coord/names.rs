//! Device names and organization domains for mesh DNS (DESIGN §10).
//!
//! A device's name is its hostname made into one DNS label: the first label of the
//! hostname, lower-cased, every character outside `a-z 0-9 -` replaced by `-`, runs of
//! `-` collapsed, `-` trimmed at both ends, at most [`MAX_BASE`] characters
//! (`device` if nothing is left). A name already taken in the organization gets
//! `-2`, `-3`, … in registration order. Pure: the store passes in the names taken.

use std::collections::HashSet;

/// The domain of an organization created without `--domain`.
pub const DEFAULT_DOMAIN: &str = "nexodus.internal";

/// Longest base label: room for a `-NNNNN` suffix inside DNS's 63.
pub const MAX_BASE: usize = 56;

/// A hostname made into a DNS-safe label (see the module docs).
pub fn normalize(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or_default();
    let mut out = String::with_capacity(first.len().min(MAX_BASE));
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
        if out.len() >= MAX_BASE {
            break;
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("device");
    }
    out
}

/// `base`, or the first of `base-2`, `base-3`, … that `taken` does not hold.
pub fn unique(base: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    (2u32..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| base.to_string())
}

/// Why a domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid domain {0:?}: expected DNS labels of a-z, 0-9 and '-' (1 to 63 characters each, \
     253 in all), e.g. nexodus.internal"
)]
pub struct DomainError(pub String);

/// Checks an organization domain and returns it lower-cased, without a final dot.
pub fn domain(s: &str) -> Result<String, DomainError> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(d)
    } else {
        Err(DomainError(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_dns_labels() {
        assert_eq!(normalize("Alpha"), "alpha");
        assert_eq!(normalize("web01.example.com"), "web01");
        assert_eq!(normalize("My_Laptop (2)"), "my-laptop-2");
        assert_eq!(normalize("--x--y--"), "x-y");
        assert_eq!(normalize("ünïcode"), "n-code");
        assert_eq!(normalize("___"), "device");
        assert_eq!(normalize(""), "device");
        assert_eq!(normalize(&"a".repeat(300)).len(), MAX_BASE);
        let long = format!("{}-b", "a".repeat(MAX_BASE - 1));
        assert_eq!(normalize(&long), "a".repeat(MAX_BASE - 1));
    }

    #[test]
    fn duplicates_get_numbers_in_order() {
        let mut taken = HashSet::new();
        let mut names = Vec::new();
        for h in ["alpha", "Alpha", "ALPHA.lan", "alpha-2", "beta"] {
            let n = unique(&normalize(h), &taken);
            taken.insert(n.clone());
            names.push(n);
        }
        assert_eq!(names, ["alpha", "alpha-2", "alpha-3", "alpha-2-2", "beta"]);
    }

    #[test]
    fn domains_are_checked() {
        assert_eq!(domain("Corp.Example.").unwrap(), "corp.example");
        assert_eq!(domain("internal").unwrap(), "internal");
        for bad in ["", ".", "a..b", "-a.b", "a_b.c", "a b", &"a".repeat(64)] {
            assert!(domain(bad).is_err(), "{bad:?}");
        }
    }
}
