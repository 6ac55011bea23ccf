//! NAT discovery from the node's own WireGuard port: STUN Binding requests to the
//! coordinator's two STUN ports, and what their answers mean.
//!
//! Pure: the shell sends the requests this module encodes from its socket and feeds
//! back the answers. Two different mappings for the two destinations mean an
//! endpoint-dependent ("symmetric") NAT, through which hole punching cannot work.

use std::net::SocketAddr;

use crate::wire::stun::{self, TransactionId};

/// How often the mapping is checked again (a NAT may change it at any time).
pub const PROBE_INTERVAL_SECS: u64 = 25;

/// What the node learned about its NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The address peers outside our NAT can send to (as seen by the first server).
    pub reflexive: SocketAddr,
    /// The two servers saw different mappings.
    pub symmetric: bool,
}

/// Combines the answers of the two STUN servers. One answer is enough to know the
/// reflexive address; the NAT is judged symmetric only when both answered differently.
pub fn classify(first: Option<SocketAddr>, second: Option<SocketAddr>) -> Option<Mapping> {
    match (first, second) {
        (Some(a), Some(b)) => Some(Mapping {
            reflexive: a,
            symmetric: a != b,
        }),
        (Some(a), None) | (None, Some(a)) => Some(Mapping {
            reflexive: a,
            symmetric: false,
        }),
        (None, None) => None,
    }
}

/// The two STUN servers of a coordinator: its address with the STUN port and the next.
pub fn servers(coordinator: SocketAddr, stun_port: u16) -> [SocketAddr; 2] {
    let mut a = coordinator;
    a.set_port(stun_port);
    let mut b = coordinator;
    b.set_port(stun_port.wrapping_add(1));
    [a, b]
}

/// One round of probes: a request per server, matched by transaction id.
#[derive(Debug, Clone)]
pub struct Probe {
    servers: [SocketAddr; 2],
    txids: [TransactionId; 2],
    answers: [Option<SocketAddr>; 2],
}

impl Probe {
    /// `random` supplies both transaction ids.
    pub fn new(servers: [SocketAddr; 2], random: [u8; 24]) -> Self {
        let mut txids = [[0u8; 12]; 2];
        txids[0].copy_from_slice(&random[..12]);
        txids[1].copy_from_slice(&random[12..]);
        Self {
            servers,
            txids,
            answers: [None, None],
        }
    }

    /// The requests to send: (destination, datagram).
    pub fn requests(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.servers
            .iter()
            .zip(&self.txids)
            .filter_map(|(&to, txid)| {
                let mut buf = vec![0u8; stun::HEADER_LEN];
                let n = stun::encode_binding_request(txid, &mut buf).ok()?;
                buf.truncate(n);
                Some((to, buf))
            })
            .collect()
    }

    /// Records an answer; true if it belonged to this probe.
    pub fn handle_response(&mut self, txid: TransactionId, mapped: SocketAddr) -> bool {
        match self.txids.iter().position(|t| *t == txid) {
            Some(i) => {
                self.answers[i] = Some(mapped);
                true
            }
            None => false,
        }
    }

    pub fn complete(&self) -> bool {
        self.answers.iter().all(Option::is_some)
    }

    pub fn result(&self) -> Option<Mapping> {
        classify(self.answers[0], self.answers[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies() {
        let a = sa("203.0.113.9:40000");
        let b = sa("203.0.113.9:40001");
        assert_eq!(
            classify(Some(a), Some(a)),
            Some(Mapping {
                reflexive: a,
                symmetric: false
            })
        );
        assert!(classify(Some(a), Some(b)).unwrap().symmetric);
        assert!(!classify(None, Some(b)).unwrap().symmetric);
        assert_eq!(classify(None, None), None);
    }

    #[test]
    fn probe_matches_transactions() {
        let servers = servers(sa("203.0.113.1:4443"), 3478);
        assert_eq!(servers[1].port(), 3479);
        let mut p = Probe::new(servers, [7; 24]);
        let reqs = p.requests();
        assert_eq!(reqs.len(), 2);
        let txid = stun::parse_binding_request(&reqs[0].1).unwrap();
        assert!(!p.handle_response([0; 12], sa("192.0.2.1:1")));
        assert!(p.handle_response(txid, sa("203.0.113.9:40000")));
        assert!(!p.complete());
        assert_eq!(p.result().unwrap().reflexive, sa("203.0.113.9:40000"));
    }
}
