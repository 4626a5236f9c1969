//! The joiner's side of redeeming an access link: a WireGuard session with the host,
//! keyed by the link's invite secret and pinned to the host's public key, over which the
//! joiner registers its own long-term public key. It uses a UDP socket of its own for the
//! few packets of the exchange, and does not touch the TUN device or the group state.
//! It also decides whether the host's answer may be installed at all
//! ([`check_admission`]): a host decides membership, never the joiner's routes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use ed25519_dalek::SigningKey;
use ipnet::Ipv4Net;
use rand::RngCore;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::group::link::Invite;
use crate::net::tunnel::kernel;
use crate::net::wire::{self, JoinMessage, Refusal};

const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot open a UDP socket for the join: {0}")]
    BindSocket(#[source] std::io::Error),
    #[error("the link names no endpoint this node can reach (none, or only IPv6 ones on a host without IPv6): ask the host for a new link with an IPv4 endpoint (its [tunnel] endpoint)")]
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
    /// The host answered with a network or addresses this node will not install.
    #[error("the host's answer is refused, nothing was changed on this node: {0}")]
    CheckAnswer(#[source] AnswerFault),
    #[error("cannot build the join message: {0}")]
    BuildMessage(#[from] wire::WireError),
}

/// The range VPN networks live in unless the configuration names another: the shared
/// address space of RFC 6598, which no public service and few LANs use.
pub const VPN_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10);

/// Why a host's answer to a join cannot be installed. A host may decide who is in its
/// group, never where this node's traffic goes: the network is the one the link named,
/// inside the VPN range, and every address it hands out lies inside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerFault {
    #[error("it offers the network {answered}, but the link named {link}")]
    NotTheLinksNetwork { answered: Ipv4Net, link: Ipv4Net },
    #[error("its network {0} is outside {VPN_RANGE} and this node's [tunnel] network {1}; set [tunnel] network to include it if you trust this host")]
    OutsideVpnRange(Ipv4Net, Ipv4Net),
    #[error("its network {0} is not a network address with room for two members")]
    NotANetwork(Ipv4Net),
    #[error("it hands out the address {0}, which is not a member address of {1}")]
    AddressOutside(Ipv4Addr, Ipv4Net),
    #[error("it gives this node the host's own address {0}")]
    HostsAddress(Ipv4Addr),
    #[error("it puts the host at {answered}, but the link named {link}")]
    NotTheLinksHost { answered: Ipv4Addr, link: Ipv4Addr },
    #[error("it names this node or the host {0:?}, which is not a valid name")]
    BadName(String),
}

/// Whether the host's answer `a` to a join through `invite` may be installed on a node
/// whose own configured network is `configured`. Pure: the caller installs nothing
/// unless this is `Ok`.
pub fn check_admission(
    a: &Admission,
    invite: &Invite,
    configured: Ipv4Net,
) -> Result<(), AnswerFault> {
    let net = a.network;
    if net != invite.network {
        return Err(AnswerFault::NotTheLinksNetwork {
            answered: net,
            link: invite.network,
        });
    }
    if !VPN_RANGE.contains(&net) && !configured.contains(&net) {
        return Err(AnswerFault::OutsideVpnRange(net, configured));
    }
    if net.trunc() != net || net.prefix_len() > 30 {
        return Err(AnswerFault::NotANetwork(net));
    }
    // A member address: inside, and neither the network's own address nor its broadcast.
    let usable = |ip: Ipv4Addr| net.contains(&ip) && ip != net.network() && ip != net.broadcast();
    if a.host_address != invite.host_address {
        return Err(AnswerFault::NotTheLinksHost {
            answered: a.host_address,
            link: invite.host_address,
        });
    }
    for ip in [a.address, a.host_address] {
        if !usable(ip) {
            return Err(AnswerFault::AddressOutside(ip, net));
        }
    }
    if a.address == a.host_address {
        return Err(AnswerFault::HostsAddress(a.address));
    }
    for name in [&a.name, &a.host_name] {
        if wire::check_name_form(name).is_err() {
            // Shown escaped and cut short: the reason stays one readable line.
            return Err(AnswerFault::BadName(
                name.chars().take(wire::MAX_NAME).collect(),
            ));
        }
    }
    Ok(())
}

/// What the host granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub address: Ipv4Addr,
    pub host_sign_key: [u8; 32],
    pub your_record: crate::group::mesh::Signed,
    pub host_record: crate::group::mesh::Signed,
    pub network: Ipv4Net,
    pub host_name: String,
    pub host_address: Ipv4Addr,
    pub host_endpoint: SocketAddr,
    pub name: String,
}

/// Redeems `invite` for the node whose keys are `my_wg` and `my_signing`, within
/// `timeout`. The private halves stay here: the request carries only a proof made with them.
pub async fn redeem(
    invite: &Invite,
    my_wg: &StaticSecret,
    my_signing: &SigningKey,
    my_name: &str,
    timeout: Duration,
) -> Result<Admission, JoinError> {
    // The host would refuse it, and the invite stays open for a better name.
    wire::check_name_form(my_name).map_err(|source| JoinError::CheckName {
        name: my_name.to_string(),
        source,
    })?;
    let my_key = PublicKey::from(my_wg).to_bytes();
    let my_sign_key = my_signing.verifying_key().to_bytes();
    let proof = wire::prove_keys(
        &wire::Transcript {
            host_key: &invite.host_key,
            invite_key: &invite.secret_public(),
            name: my_name,
            wg_key: &my_key,
            sign_key: &my_sign_key,
        },
        my_wg,
        my_signing,
    )?;
    // Every endpoint of the link, IPv4 and IPv6, is knocked at at once: the first that
    // completes the handshake is the host's. An IPv4-only socket (a host without IPv6)
    // leaves the IPv6 ones out rather than fail on each send.
    let sock = kernel::bind_udp(0)
        .and_then(UdpSocket::from_std)
        .map_err(JoinError::BindSocket)?;
    let local = sock.local_addr().map_err(JoinError::BindSocket)?;
    let endpoints: Vec<SocketAddr> = invite
        .endpoints
        .iter()
        .map(|e| kernel::unmapped(*e))
        .filter(|e| local.is_ipv6() || e.is_ipv4())
        .collect();
    if endpoints.is_empty() {
        return Err(JoinError::NoEndpoint);
    }
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
            proof: Some(proof),
        },
    )?;
    let deadline = Instant::now() + timeout;
    let mut host: Option<SocketAddr> = None;
    let mut rx = vec![0u8; 2048];
    let mut tx = vec![0u8; 2048];
    let mut next_try = Instant::now();
    let mut first_round = true;
    loop {
        if Instant::now() >= next_try {
            next_try = Instant::now() + RETRY;
            match host {
                // Session up: the request may have been lost; send it again.
                Some(ep) => {
                    if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&request, &mut tx) {
                        let _ = sock.send_to(p, kernel::for_socket(ep, local)).await;
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
                        // IPv6 gets one retry's head start, when the link has both: a
                        // host that answers on both is then joined, and sees this node,
                        // over IPv6, as the tunnel's knocks prefer it afterwards.
                        let v6_first = first_round && endpoints.iter().any(|e| e.is_ipv6());
                        first_round = false;
                        for ep in endpoints.iter().filter(|e| !v6_first || e.is_ipv6()) {
                            let _ = sock.send_to(&p, kernel::for_socket(*ep, local)).await;
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
        let from = kernel::unmapped(from);
        match tunn.decapsulate(Some(from.ip()), &rx[..n], &mut tx) {
            TunnResult::WriteToNetwork(p) => {
                // The handshake completed: this endpoint is the authenticated host.
                host = Some(from);
                let to = kernel::for_socket(from, local);
                let _ = sock.send_to(p, to).await;
                let mut flush = vec![0u8; 2048];
                while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut flush) {
                    let _ = sock.send_to(p, to).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::link::InviteId;

    fn invite(network: &str, host_address: &str) -> Invite {
        Invite {
            host_key: [7; 32],
            host_name: "living-room".into(),
            host_address: host_address.parse().unwrap(),
            network: network.parse().unwrap(),
            endpoints: vec!["203.0.113.10:51871".parse().unwrap()],
            invite_id: InviteId([1; 8]),
            expires_at: 10,
            secret: zeroize::Zeroizing::new([9; 32]),
        }
    }

    fn answer(network: &str, address: &str, host_address: &str) -> Admission {
        let record = crate::group::mesh::Signed {
            body: String::new(),
            sig: String::new(),
        };
        Admission {
            address: address.parse().unwrap(),
            host_sign_key: [8; 32],
            your_record: record.clone(),
            host_record: record,
            network: network.parse().unwrap(),
            host_name: "living-room".into(),
            host_address: host_address.parse().unwrap(),
            host_endpoint: "203.0.113.10:51871".parse().unwrap(),
            name: "kitchen".into(),
        }
    }

    fn default_net() -> Ipv4Net {
        "100.77.0.0/16".parse().unwrap()
    }

    #[test]
    fn an_answer_inside_the_links_network_in_the_vpn_range_passes() {
        let inv = invite("100.77.0.0/16", "100.77.0.1");
        let a = answer("100.77.0.0/16", "100.77.0.2", "100.77.0.1");
        assert_eq!(check_admission(&a, &inv, default_net()), Ok(()));
        let inv = invite("100.100.0.0/24", "100.100.0.1");
        let a = answer("100.100.0.0/24", "100.100.0.9", "100.100.0.1");
        assert_eq!(
            check_admission(&a, &inv, default_net()),
            Ok(()),
            "anywhere in 100.64/10"
        );
    }

    #[test]
    fn a_network_that_is_not_the_links_is_refused_in_one_line() {
        let inv = invite("100.77.0.0/16", "100.77.0.1");
        let a = answer("1.0.0.0/8", "1.1.1.1", "100.77.0.1");
        let e = check_admission(&a, &inv, default_net()).unwrap_err();
        assert!(matches!(e, AnswerFault::NotTheLinksNetwork { .. }));
        let line = JoinError::CheckAnswer(e).to_string();
        assert!(
            !line.contains('\n')
                && line.contains("1.0.0.0/8")
                && line.contains("nothing was changed"),
            "{line}"
        );
        // A wider network that contains the link's is just as foreign.
        let a = answer("100.64.0.0/10", "100.77.0.2", "100.77.0.1");
        assert!(matches!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::NotTheLinksNetwork { .. })
        ));
    }

    #[test]
    fn a_link_and_answer_outside_the_vpn_range_are_refused_unless_configured() {
        let inv = invite("1.0.0.0/8", "1.0.0.1");
        let a = answer("1.0.0.0/8", "1.1.1.1", "1.0.0.1");
        assert!(matches!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::OutsideVpnRange(..))
        ));
        let inv = invite("10.99.0.0/16", "10.99.0.1");
        let a = answer("10.99.0.0/16", "10.99.0.2", "10.99.0.1");
        assert!(check_admission(&a, &inv, default_net()).is_err());
        let configured = "10.99.0.0/16".parse().unwrap();
        assert_eq!(check_admission(&a, &inv, configured), Ok(()));
    }

    #[test]
    fn addresses_outside_the_network_or_not_usable_in_it_are_refused() {
        let inv = invite("100.77.0.0/16", "100.77.0.1");
        for (mine, host) in [
            ("1.1.1.1", "100.77.0.1"),
            ("100.78.0.2", "100.77.0.1"),
            ("100.77.0.0", "100.77.0.1"),
            ("100.77.255.255", "100.77.0.1"),
        ] {
            let a = answer("100.77.0.0/16", mine, host);
            assert!(
                matches!(
                    check_admission(&a, &inv, default_net()),
                    Err(AnswerFault::AddressOutside(..))
                ),
                "{mine}"
            );
        }
        let a = answer("100.77.0.0/16", "100.77.0.1", "100.77.0.1");
        assert_eq!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::HostsAddress("100.77.0.1".parse().unwrap()))
        );
        let a = answer("100.77.0.0/16", "100.77.0.2", "100.77.0.3");
        assert!(matches!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::NotTheLinksHost { .. })
        ));
        let inv = invite("100.77.0.0/31", "100.77.0.1");
        let a = answer("100.77.0.0/31", "100.77.0.0", "100.77.0.1");
        assert!(matches!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::NotANetwork(_))
        ));
    }

    #[test]
    fn a_host_name_a_terminal_would_act_on_is_refused() {
        let inv = invite("100.77.0.0/16", "100.77.0.1");
        let mut a = answer("100.77.0.0/16", "100.77.0.2", "100.77.0.1");
        a.host_name = "host\u{1b}]2;pwned\u{7}".into();
        assert!(matches!(
            check_admission(&a, &inv, default_net()),
            Err(AnswerFault::BadName(_))
        ));
    }
}
