//! STUN Binding responders of the coordinator (shell around [`crate::wire::stun`]).
//!
//! Two ports answer: `--stun-listen` and the next one, so a node can compare the
//! mappings its one local port gets towards two destinations (symmetric NAT test).

use std::net::SocketAddr;

use crate::wire::stun;

/// The two STUN listen addresses for a configured one (port and port + 1).
pub fn ports(first: SocketAddr) -> Vec<SocketAddr> {
    let mut second = first;
    second.set_port(first.port().wrapping_add(1));
    if first.port() == 0 {
        vec![first]
    } else {
        vec![first, second]
    }
}

/// Answers Binding requests forever; anything else is dropped and counted.
pub async fn serve(socket: tokio::net::UdpSocket) {
    let mut inbuf = [0u8; 1500];
    let mut outbuf = [0u8; 64];
    let mut dropped: u64 = 0;
    let local = socket.local_addr().ok();
    loop {
        let (len, from) = match socket.recv_from(&mut inbuf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(?local, error = %e, "STUN receive error");
                continue;
            }
        };
        // On a dual-stack socket IPv4 clients arrive v4-mapped: answer with the
        // address they know (a v4 XOR-MAPPED-ADDRESS), sent back the way it came.
        match stun::respond(&inbuf[..len], crate::io::udp::canonical(from), &mut outbuf) {
            Some(n) => {
                if let Err(e) = socket.send_to(&outbuf[..n], from).await {
                    tracing::debug!(?local, %from, error = %e, "STUN send failed");
                }
            }
            None => {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::debug!(?local, %from, dropped, "dropped non-STUN datagrams");
                }
            }
        }
    }
}
