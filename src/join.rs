//! The joiner's side of redeeming an access link: a WireGuard session with the host,
//! keyed by the link's invite secret and pinned to the host's public key, over which the
//! joiner registers its own long-term public key. It uses a UDP socket of its own for the
//! few packets of the exchange, and does not touch the TUN device or the group state.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use ipnet::Ipv4Net;
use rand::RngCore;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::link::Invite;
use crate::wire::{self, JoinMessage, Refusal};

const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot open a UDP socket for the join: {0}")]
    BindSocket(#[source] std::io::Error),
    #[error("the link names no endpoint this node can reach")]
    NoEndpoint,
    /// Also what a node answering with another key looks like: its handshake never
    /// authenticates, because the link pins the host's key.
    #[error("no answer from the host at {0}: it is offline, unreachable, or not the host this link names")]
    HostUnreachable(String),
    #[error("the host refused the join: {0}")]
    Refused(Refusal),
    #[error("this node cannot join under its name {name:?}: {source}")]
    CheckName {
        name: String,
        source: wire::NameRefusal,
    },
    #[error("cannot build the join message: {0}")]
    BuildMessage(#[from] wire::WireError),
}

/// What the host granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub address: Ipv4Addr,
    pub host_sign_key: [u8; 32],
    pub your_record: crate::mesh::Signed,
    pub host_record: crate::mesh::Signed,
    pub network: Ipv4Net,
    pub host_name: String,
    pub host_address: Ipv4Addr,
    pub host_endpoint: SocketAddr,
    pub name: String,
}

/// Redeems `invite` for the node whose public key is `my_key`, within `timeout`.
pub async fn redeem(
    invite: &Invite,
    my_key: [u8; 32],
    my_sign_key: [u8; 32],
    my_name: &str,
    timeout: Duration,
) -> Result<Admission, JoinError> {
    // The host would refuse it, and the invite stays open for a better name.
    wire::check_name_form(my_name).map_err(|source| JoinError::CheckName {
        name: my_name.to_string(),
        source,
    })?;
    let endpoints: Vec<SocketAddr> = invite
        .endpoints
        .iter()
        .filter(|e| e.is_ipv4())
        .copied()
        .collect();
    if endpoints.is_empty() {
        return Err(JoinError::NoEndpoint);
    }
    let sock = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(JoinError::BindSocket)?;
    let mut tunn = Tunn::new(
        StaticSecret::from(*invite.secret),
        PublicKey::from(invite.host_key),
        None,
        None,
        rand::rngs::OsRng.next_u32() >> 8,
        None,
    );
    let request = wire::encode(
        wire::JOINER_ADDRESS,
        invite.host_address,
        &JoinMessage::Request {
            name: my_name.to_string(),
            public_key: my_key,
            sign_key: my_sign_key,
        },
    )?;
    let deadline = Instant::now() + timeout;
    let mut host: Option<SocketAddr> = None;
    let mut rx = vec![0u8; 2048];
    let mut tx = vec![0u8; 2048];
    let mut next_try = Instant::now();
    loop {
        if Instant::now() >= next_try {
            next_try = Instant::now() + RETRY;
            match host {
                // Session up: the request may have been lost; send it again.
                Some(ep) => {
                    if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&request, &mut tx) {
                        let _ = sock.send_to(p, ep).await;
                    }
                }
                None => {
                    let res = match tunn.encapsulate(&request, &mut tx) {
                        TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                        _ => match tunn.format_handshake_initiation(&mut tx, true) {
                            TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                            _ => None,
                        },
                    };
                    if let Some(p) = res {
                        for ep in &endpoints {
                            let _ = sock.send_to(&p, ep).await;
                        }
                    }
                }
            }
        }
        let wait = next_try.min(deadline);
        let received = tokio::select! {
            r = sock.recv_from(&mut rx) => r.ok(),
            () = tokio::time::sleep_until(wait) => None,
        };
        if Instant::now() >= deadline {
            let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
            return Err(JoinError::HostUnreachable(list.join(", ")));
        }
        let Some((n, from)) = received else { continue };
        match tunn.decapsulate(Some(from.ip()), &rx[..n], &mut tx) {
            TunnResult::WriteToNetwork(p) => {
                // The handshake completed: this endpoint is the authenticated host.
                host = Some(from);
                let _ = sock.send_to(p, from).await;
                let mut flush = vec![0u8; 2048];
                while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut flush) {
                    let _ = sock.send_to(p, from).await;
                }
            }
            TunnResult::WriteToTunnelV4(p, _) => {
                host = Some(from);
                match wire::decode(p) {
                    Ok(JoinMessage::Accepted {
                        address,
                        network,
                        host_name,
                        host_address,
                        name,
                        host_sign_key,
                        your_record,
                        host_record,
                    }) => {
                        return Ok(Admission {
                            address,
                            host_sign_key,
                            your_record,
                            host_record,
                            network,
                            host_name,
                            host_address,
                            host_endpoint: from,
                            name,
                        })
                    }
                    Ok(JoinMessage::Refused { reason }) => return Err(JoinError::Refused(reason)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}
