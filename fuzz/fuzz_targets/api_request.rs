//! The admin API's request parser under arbitrary input: method, path, query and body
//! (split from the input at newlines) must give a call or an error, never panic.
//! Contracts: an error is a 4xx with a stable code; an oversized body is never
//! accepted; a call that parses comes from one of the known methods.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexodus::serve::api::request::{MAX_BODY, parse, percent_decode};

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let query = parts
        .next()
        .map(|q| String::from_utf8_lossy(q).into_owned());
    let body = parts.next().unwrap_or_default();
    let _ = percent_decode(&path);
    match parse(method, &path, query.as_deref(), body) {
        Ok(_) => {
            assert!(body.len() <= MAX_BODY);
            assert!(["GET", "POST", "PUT", "DELETE"].contains(&method));
        }
        Err(e) => {
            assert!((400..500).contains(&e.status), "{e:?}");
            assert!(!e.code.is_empty());
        }
    }
});
