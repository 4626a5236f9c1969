//! The route of one transfer: which hops a file's chunks take from the member that holds
//! it to the member that wants it — over the tunnel, over a site's LAN relay, or both.
//! Pure: it sees the members and their sites as the caller describes them and returns a
//! route with the reason for it.
//!
//! The four cases (DN: a distant node, alone behind its public IP; NN: a nearby node,
//! one of several behind the same public IP, a "site"):
//! 1. DN → DN: tunnel.
//! 2. DN → NN: tunnel to the site's gateway, then the gateway's LAN relay.
//! 3. NN → DN: the source's site gateway pulls over the LAN, then tunnel.
//! 4. NN → NN (same site): LAN relay only.
//!
//! NN → NN across two sites is 3 then 2. The gateway of a site for a transfer is chosen
//! by rendezvous hashing of the transfer id with each member's key, so every member of
//! the site picks the same one without talking, different transfers spread over the
//! site's members, and removing a failed gateway moves only its transfers.

use serde::{Deserialize, Serialize};

use crate::group::identity::Key;

/// A member as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Key,
    pub name: String,
    /// The public IP it is behind, when known; members sharing it form a site.
    pub site: Option<String>,
    /// Whether it can serve now (its tunnel or LAN path is alive).
    pub up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Tunnel,
    Lan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    pub from: String,
    pub to: String,
    pub via: Via,
    #[serde(skip)]
    pub from_key: Key,
    #[serde(skip)]
    pub to_key: Key,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// 1 to 4 as in the brief; 0 when source and requester are the same node; 5 for
    /// nearby to nearby across two sites (case 3 then case 2).
    pub case: u8,
    pub hops: Vec<Hop>,
    pub why: String,
}

impl Route {
    /// The hop that delivers to the requester: whom to ask, and how.
    pub fn feeder(&self) -> Option<&Hop> {
        self.hops.last()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the member holding the file is not in the group")]
    UnknownSource,
    #[error("this node is not in the group")]
    UnknownRequester,
}

/// The members of `m`'s site that can serve, `m` included; only `m` when it has no site.
fn site_of<'a>(members: &'a [Member], m: &'a Member) -> Vec<&'a Member> {
    match &m.site {
        None => vec![m],
        Some(s) => {
            let mut v: Vec<&Member> = members
                .iter()
                .filter(|o| o.key == m.key || (o.up && o.site.as_deref() == Some(s)))
                .collect();
            v.sort_by_key(|o| o.key);
            v.dedup_by_key(|o| o.key);
            v
        }
    }
}

/// The site's gateway for `transfer`: the highest rendezvous score among members not
/// excluded. `fallback` serves when every member is excluded.
pub fn gateway<'a>(
    site: &[&'a Member],
    transfer: &str,
    exclude: &[Key],
    fallback: &'a Member,
) -> &'a Member {
    site.iter()
        .filter(|m| !exclude.contains(&m.key))
        .max_by_key(|m| {
            let mut h = blake3::Hasher::new();
            h.update(transfer.as_bytes());
            h.update(&m.key);
            *h.finalize().as_bytes()
        })
        .copied()
        .unwrap_or(fallback)
}

fn hop(from: &Member, to: &Member, via: Via) -> Hop {
    Hop {
        from: from.name.clone(),
        to: to.name.clone(),
        via,
        from_key: from.key,
        to_key: to.key,
    }
}

/// Plans `transfer` (a file version's id) from `source` to `requester`. `exclude` lists
/// gateways the requester saw fail; they are not chosen again on its side.
pub fn plan(
    members: &[Member],
    source: &Key,
    requester: &Key,
    transfer: &str,
    exclude: &[Key],
) -> Result<Route, PlanError> {
    let src = members
        .iter()
        .find(|m| &m.key == source)
        .ok_or(PlanError::UnknownSource)?;
    let req = members
        .iter()
        .find(|m| &m.key == requester)
        .ok_or(PlanError::UnknownRequester)?;
    if src.key == req.key {
        return Ok(Route {
            case: 0,
            hops: Vec::new(),
            why: "the file is on this node".into(),
        });
    }
    let src_site = site_of(members, src);
    let req_site = site_of(members, req);
    let src_nearby = src_site.len() > 1;
    let req_nearby = req_site.len() > 1;
    if src.site.is_some() && src.site == req.site && src_site.iter().any(|m| m.key == req.key) {
        return Ok(Route {
            case: 4,
            hops: vec![hop(src, req, Via::Lan)],
            why: format!(
                "{} and {} are behind the same public IP ({}): the LAN relay alone, nothing crosses the internet",
                src.name,
                req.name,
                src.site.as_deref().unwrap_or("?")
            ),
        });
    }
    // The source's side: its site's gateway pulls it over the LAN. The requester's
    // exclusions do not apply here; a dead source-side gateway is bypassed when fetching.
    let gs = if src_nearby {
        gateway(&src_site, transfer, &[], src)
    } else {
        src
    };
    let gr = if req_nearby {
        gateway(&req_site, transfer, exclude, req)
    } else {
        req
    };
    let mut hops = Vec::new();
    if gs.key != src.key {
        hops.push(hop(src, gs, Via::Lan));
    }
    hops.push(hop(gs, gr, Via::Tunnel));
    if gr.key != req.key {
        hops.push(hop(gr, req, Via::Lan));
    }
    let (case, why) = match (src_nearby, req_nearby) {
        (false, false) => (1, format!("{} and {} are each alone behind their own public IP: straight through the tunnel", src.name, req.name)),
        (false, true) => (
            2,
            format!(
                "{} is distant and {} shares its public IP with {} other member(s): {} is this transfer's gateway there and pulls each chunk over the internet once",
                src.name,
                req.name,
                req_site.len() - 1,
                gr.name
            ),
        ),
        (true, false) => (
            3,
            format!(
                "{} shares its public IP with {} other member(s): {} gathers the chunks over the LAN and sends them to the distant {}",
                src.name,
                src_site.len() - 1,
                gs.name,
                req.name
            ),
        ),
        (true, true) => (
            5,
            format!(
                "both sides are sites: {} gathers at the source's site, {} receives at {}'s site",
                gs.name, gr.name, req.name
            ),
        ),
    };
    Ok(Route { case, hops, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u8, site: Option<&str>) -> Member {
        Member {
            key: [n; 32],
            name: format!("n{n}"),
            site: site.map(String::from),
            up: true,
        }
    }

    /// 1: distant host; 2: distant; 3, 4, 5: site A; 6, 7: site B.
    fn group() -> Vec<Member> {
        vec![
            m(1, Some("198.51.100.1")),
            m(2, Some("198.51.100.2")),
            m(3, Some("203.0.113.3")),
            m(4, Some("203.0.113.3")),
            m(5, Some("203.0.113.3")),
            m(6, Some("203.0.113.6")),
            m(7, Some("203.0.113.6")),
        ]
    }

    fn vias(r: &Route) -> Vec<Via> {
        r.hops.iter().map(|h| h.via).collect()
    }

    #[test]
    fn distant_to_distant_goes_straight_through_the_tunnel() {
        let r = plan(&group(), &[1; 32], &[2; 32], "f", &[]).unwrap();
        assert_eq!(r.case, 1);
        assert_eq!(vias(&r), vec![Via::Tunnel]);
    }

    #[test]
    fn distant_to_nearby_goes_through_one_gateway_of_the_site() {
        let g = group();
        let routes: Vec<Route> = [3u8, 4, 5]
            .iter()
            .map(|n| plan(&g, &[2; 32], &[*n; 32], "f", &[]).unwrap())
            .collect();
        let gateways: Vec<Key> = routes.iter().map(|r| r.hops[0].to_key).collect();
        assert!(
            gateways.windows(2).all(|w| w[0] == w[1]),
            "the site disagrees on its gateway"
        );
        for (r, n) in routes.iter().zip([3u8, 4, 5]) {
            assert_eq!(r.case, 2);
            assert_eq!(r.hops[0].via, Via::Tunnel);
            if r.hops[0].to_key == [n; 32] {
                assert_eq!(r.hops.len(), 1, "the gateway itself needs no LAN hop");
            } else {
                assert_eq!(vias(r), vec![Via::Tunnel, Via::Lan]);
            }
        }
    }

    /// Each hop as (from, to, via), by name.
    fn hops(r: &Route) -> Vec<(&str, &str, Via)> {
        r.hops
            .iter()
            .map(|h| (h.from.as_str(), h.to.as_str(), h.via))
            .collect()
    }

    /// The first transfer id whose gateway in `site` is not `not`: a route with every hop.
    fn id_with_gateway_other_than(g: &[Member], site: &[u8], not: u8) -> (String, String) {
        let site: Vec<&Member> = g.iter().filter(|m| site.contains(&m.key[0])).collect();
        (0..64)
            .map(|i| format!("f{i}"))
            .find_map(|id| {
                let gw = gateway(&site, &id, &[], site[0]);
                (gw.key != [not; 32]).then(|| (id.clone(), gw.name.clone()))
            })
            .expect("some transfer has another gateway")
    }

    #[test]
    fn nearby_to_distant_gathers_at_the_source_sites_gateway() {
        let g = group();
        let (id, ga) = id_with_gateway_other_than(&g, &[3, 4, 5], 3);
        let r = plan(&g, &[3; 32], &[2; 32], &id, &[]).unwrap();
        assert_eq!(r.case, 3);
        assert_eq!(
            hops(&r),
            vec![
                ("n3", ga.as_str(), Via::Lan),
                (ga.as_str(), "n2", Via::Tunnel)
            ]
        );
    }

    #[test]
    fn nearby_to_nearby_on_one_site_uses_the_lan_only() {
        let r = plan(&group(), &[3; 32], &[5; 32], "f", &[]).unwrap();
        assert_eq!(r.case, 4);
        assert_eq!(vias(&r), vec![Via::Lan]);
    }

    #[test]
    fn a_failed_gateway_is_replaced_by_another_member_of_the_site() {
        let g = group();
        let first = plan(&g, &[2; 32], &[3; 32], "f", &[]).unwrap();
        let gw = first.hops[0].to_key;
        let second = plan(&g, &[2; 32], &[3; 32], "f", &[gw]).unwrap();
        assert_ne!(second.hops[0].to_key, gw);
        let all = [[3u8; 32], [4; 32], [5; 32]];
        let last = plan(&g, &[2; 32], &[3; 32], "f", &all).unwrap();
        assert_eq!(
            vias(&last),
            vec![Via::Tunnel],
            "with every gateway gone the requester pulls itself"
        );
        assert_eq!(last.hops[0].to_key, [3; 32]);
    }

    #[test]
    fn a_down_member_is_never_a_gateway() {
        let mut g = group();
        for n in &mut g {
            if n.key == [4; 32] || n.key == [5; 32] {
                n.up = false;
            }
        }
        let r = plan(&g, &[2; 32], &[3; 32], "f", &[]).unwrap();
        assert_eq!(r.case, 1, "a site of one that can serve is a distant node");
        assert_eq!(r.hops[0].to_key, [3; 32]);
    }

    #[test]
    fn transfers_spread_over_the_sites_members() {
        let g = group();
        let chosen: std::collections::BTreeSet<Key> = (0..64)
            .map(|i| {
                plan(&g, &[2; 32], &[3; 32], &format!("file{i}"), &[])
                    .unwrap()
                    .hops[0]
                    .to_key
            })
            .collect();
        assert_eq!(chosen.len(), 3);
    }

    #[test]
    fn across_two_sites_both_gateways_are_used() {
        let g = group();
        // A transfer whose gateways are neither end: site B has two members, so n7.
        let id = (0..64)
            .map(|i| format!("f{i}"))
            .find(|id| {
                let a: Vec<&Member> = g[2..5].iter().collect();
                let b: Vec<&Member> = g[5..7].iter().collect();
                gateway(&a, id, &[], &g[2]).key != [3; 32]
                    && gateway(&b, id, &[], &g[5]).key != [6; 32]
            })
            .expect("some transfer has other gateways at both ends");
        let r = plan(&g, &[3; 32], &[6; 32], &id, &[]).unwrap();
        assert_eq!(r.case, 5);
        // The same gateways as each site picks for a distant peer of the same transfer.
        let ga = plan(&g, &[3; 32], &[2; 32], &id, &[]).unwrap().hops[0]
            .to
            .clone();
        let gb = plan(&g, &[2; 32], &[6; 32], &id, &[]).unwrap().hops[0]
            .to
            .clone();
        assert_eq!(gb, "n7");
        assert_eq!(
            hops(&r),
            vec![
                ("n3", ga.as_str(), Via::Lan),
                (ga.as_str(), "n7", Via::Tunnel),
                ("n7", "n6", Via::Lan),
            ]
        );
    }
}
