//! NAT discovery from the node's own WireGuard port: STUN Binding requests to the
//! coordinator's two STUN ports, and what their answers mean.
//!
//! Pure: the shell sends the requests this module encodes from its socket and feeds
//! back the answers. Two different mappings for the two destinations mean an
//! endpoint-dependent ("symmetric") NAT, through which hole punching cannot work.
//!
//! [`Prober`] schedules the rounds (at start, then every [`PROBE_INTERVAL_SECS`]; a
//! round sends its requests up to [`PROBE_ATTEMPTS`] times, [`ATTEMPT_TIMEOUT`]
//! apart) from the `now` it is given; it opens no socket and reads no clock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::stun::{self, TransactionId};

/// How often the mapping is checked again (a NAT may change it at any time).
pub const PROBE_INTERVAL_SECS: u64 = 25;
/// How many times a round sends its requests before it settles for what it has.
pub const PROBE_ATTEMPTS: u8 = 3;
/// How long a round waits for answers after each sending.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

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

/// What a finished round learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvent {
    /// At least one server answered.
    Mapping(Mapping),
    /// Neither server answered any attempt.
    NoAnswer { servers: [SocketAddr; 2] },
}

#[derive(Debug, Clone)]
enum Round {
    /// Waiting for the next round; `None`: as soon as the servers are known.
    Idle { next: Option<Instant> },
    Probing {
        probe: Box<Probe>,
        attempt: u8,
        deadline: Instant,
    },
}

/// Runs probe rounds: feed it the servers, answers and timeouts; take the datagrams
/// to send ([`Self::poll_transmit`]) and what each round learned ([`Self::poll_event`]).
#[derive(Debug, Clone)]
pub struct Prober {
    servers: Option<[SocketAddr; 2]>,
    round: Round,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<ProbeEvent>,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Self {
        Self {
            servers: None,
            round: Round::Idle { next: None },
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The STUN servers to probe (from the coordinator's snapshot; `None`: it has
    /// none); the next round uses them. The first round starts once they are known.
    pub fn handle_servers(&mut self, servers: Option<[SocketAddr; 2]>, now: Instant) {
        self.servers = servers;
        if let Round::Idle { next: next @ None } = &mut self.round
            && servers.is_some()
        {
            *next = Some(now);
        }
    }

    /// When [`Self::handle_timeout`] is due next (never while no server is known
    /// and no round runs).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.round {
            Round::Idle { next } => next.filter(|_| self.servers.is_some()),
            Round::Probing { deadline, .. } => Some(*deadline),
        }
    }

    /// Starts a round that is due (`random` gives its transaction ids), sends the
    /// requests again, or ends a round whose attempts are used up.
    pub fn handle_timeout(&mut self, now: Instant, random: [u8; 24]) {
        match &mut self.round {
            Round::Idle { next: Some(t) } if *t <= now => {
                let Some(servers) = self.servers else { return };
                let probe = Probe::new(servers, random);
                self.transmits.extend(probe.requests());
                self.round = Round::Probing {
                    probe: Box::new(probe),
                    attempt: 1,
                    deadline: now + ATTEMPT_TIMEOUT,
                };
            }
            Round::Probing {
                probe,
                attempt,
                deadline,
                ..
            } if *deadline <= now => {
                if *attempt < PROBE_ATTEMPTS {
                    *attempt += 1;
                    *deadline = now + ATTEMPT_TIMEOUT;
                    self.transmits.extend(probe.requests());
                } else {
                    self.finish(now);
                }
            }
            _ => {}
        }
    }

    /// A STUN answer from the WireGuard port; answers to older rounds are ignored.
    pub fn handle_response(&mut self, txid: TransactionId, mapped: SocketAddr, now: Instant) {
        if let Round::Probing { probe, .. } = &mut self.round
            && probe.handle_response(txid, mapped)
            && probe.complete()
        {
            self.finish(now);
        }
    }

    fn finish(&mut self, now: Instant) {
        if let Round::Probing { probe, .. } = &self.round {
            self.events.push_back(match probe.result() {
                Some(m) => ProbeEvent::Mapping(m),
                None => ProbeEvent::NoAnswer {
                    servers: probe.servers,
                },
            });
        }
        self.round = Round::Idle {
            next: Some(now + Duration::from_secs(PROBE_INTERVAL_SECS)),
        };
    }

    /// The next request to send from the WireGuard port: (destination, datagram).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// What the last finished round learned.
    pub fn poll_event(&mut self) -> Option<ProbeEvent> {
        self.events.pop_front()
    }
}

/// STUN requests remembered by a [`StunGate`] (a round sends two per family, v4
/// and v6, up to [`PROBE_ATTEMPTS`] times; older ones have timed out).
pub const GATE_SLOTS: usize = 16;

/// Which STUN answers arriving on the WireGuard port are passed on: only from a
/// server we sent a request to, carrying that request's transaction id, once.
/// Everything else is the data path's to drop and count. Fixed size, no allocation.
#[derive(Debug, Default)]
pub struct StunGate {
    asked: [Option<(SocketAddr, TransactionId)>; GATE_SLOTS],
    next: usize,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl StunGate {
    /// A datagram leaves the WireGuard port for `to`: remembered if it is a
    /// Binding request (the oldest remembered one goes).
    pub fn sent(&mut self, to: SocketAddr, datagram: &[u8]) {
        if let Ok(txid) = stun::parse_binding_request(datagram)
            && let Some(slot) = self.asked.get_mut(self.next % GATE_SLOTS)
        {
            *slot = Some((canonical(to), txid));
            self.next = (self.next + 1) % GATE_SLOTS;
        }
    }

    /// An answer with `txid` arrived from `from`: true (and forgotten) if we asked
    /// `from` with that transaction id.
    pub fn admit(&mut self, from: SocketAddr, txid: &TransactionId) -> bool {
        let from = canonical(from);
        match self
            .asked
            .iter_mut()
            .find(|s| s.is_some_and(|(to, t)| to == from && t == *txid))
        {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_admits_only_answers_to_our_requests_once() {
        let server = sa("203.0.113.1:3478");
        let other = sa("203.0.113.1:3479");
        let mut gate = StunGate::default();
        let txid = [7u8; 12];
        // Nothing asked: nothing admitted.
        assert!(!gate.admit(server, &txid));
        let mut buf = [0u8; 64];
        let n = stun::encode_binding_request(&txid, &mut buf).unwrap();
        // Not a STUN request (a WireGuard datagram): not remembered.
        gate.sent(server, &[1, 0, 0, 0, 9, 9]);
        gate.sent(server, &buf[..n]);
        assert!(!gate.admit(other, &txid), "another port");
        assert!(!gate.admit(sa("198.51.100.9:3478"), &txid), "another host");
        assert!(!gate.admit(server, &[8u8; 12]), "another transaction");
        // A v4-mapped source is the same server.
        assert!(gate.admit(sa("[::ffff:203.0.113.1]:3478"), &txid));
        assert!(!gate.admit(server, &txid), "admitted once");
        // Only the last GATE_SLOTS requests are remembered.
        for i in 0..=GATE_SLOTS {
            let n = stun::encode_binding_request(&[i as u8; 12], &mut buf).unwrap();
            gate.sent(server, &buf[..n]);
        }
        assert!(!gate.admit(server, &[0u8; 12]));
        assert!(gate.admit(server, &[1u8; 12]));
        assert!(gate.admit(server, &[GATE_SLOTS as u8; 12]));
    }

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

    fn sent(p: &mut Prober) -> Vec<(SocketAddr, Vec<u8>)> {
        std::iter::from_fn(|| p.poll_transmit()).collect()
    }

    #[test]
    fn prober_waits_for_servers_then_retries_and_settles() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        assert_eq!(p.poll_timeout(), None);
        let servers = servers(sa("203.0.113.1:4443"), 3478);
        p.handle_servers(Some(servers), t0);
        assert_eq!(p.poll_timeout(), Some(t0));
        p.handle_timeout(t0, [7; 24]);
        let first = sent(&mut p);
        assert_eq!(first.len(), 2);
        assert_eq!(p.poll_timeout(), Some(t0 + ATTEMPT_TIMEOUT));
        // Nothing answers: the same requests go out again, then the round ends.
        let mut now = t0;
        for _ in 1..PROBE_ATTEMPTS {
            now += ATTEMPT_TIMEOUT;
            p.handle_timeout(now, [9; 24]);
            assert_eq!(sent(&mut p), first);
        }
        assert_eq!(p.poll_event(), None);
        now += ATTEMPT_TIMEOUT;
        p.handle_timeout(now, [9; 24]);
        assert!(sent(&mut p).is_empty());
        assert_eq!(p.poll_event(), Some(ProbeEvent::NoAnswer { servers }));
        assert_eq!(
            p.poll_timeout(),
            Some(now + Duration::from_secs(PROBE_INTERVAL_SECS))
        );
    }

    #[test]
    fn prober_ends_a_round_when_both_answer() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        p.handle_servers(Some(servers(sa("203.0.113.1:4443"), 3478)), t0);
        p.handle_timeout(t0, std::array::from_fn(|i| i as u8));
        let reqs = sent(&mut p);
        let mapped = sa("203.0.113.9:40000");
        for (i, (_, data)) in reqs.iter().enumerate() {
            assert_eq!(p.poll_event(), None, "answer {i}");
            let txid = stun::parse_binding_request(data).unwrap();
            p.handle_response(txid, mapped, t0);
        }
        assert_eq!(
            p.poll_event(),
            Some(ProbeEvent::Mapping(Mapping {
                reflexive: mapped,
                symmetric: false
            }))
        );
        // A late duplicate changes nothing.
        let txid = stun::parse_binding_request(&reqs[0].1).unwrap();
        p.handle_response(txid, sa("203.0.113.9:1"), t0);
        assert_eq!(p.poll_event(), None);
        assert_eq!(
            p.poll_timeout(),
            Some(t0 + Duration::from_secs(PROBE_INTERVAL_SECS))
        );
    }
}
