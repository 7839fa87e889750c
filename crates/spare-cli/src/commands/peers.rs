//! `spare peers`

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use spare_node::api::types::{OfferView, PeerView};

use crate::{Context, output};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let peers: Vec<PeerView> = context.client().get("/v1/peers").await?;
    if args.json {
        output::json(&peers)?;
        return Ok(ExitCode::SUCCESS);
    }
    if peers.is_empty() {
        writeln!(
            std::io::stdout(),
            "no peers connected (join a swarm with `spare up --bootstrap <addr>`; nodes on one \
             LAN also find each other with mDNS, unless started with --no-mdns)"
        )
        .context(output::CANNOT_WRITE)?;
        return Ok(ExitCode::SUCCESS);
    }
    output::table(&rows(&peers))?;
    Ok(ExitCode::SUCCESS)
}

/// What a peer's offer says it gives: `paused (<why>)` when it offers no
/// cores (a node offers 0 cores only while its governor pauses its guests,
/// since it is configured with at least one), `busy` when every core it
/// offers is taken, `giving` otherwise.
fn offer_state(offer: &OfferView) -> String {
    if offer.cores == 0 {
        match &offer.paused {
            Some(why) => format!("paused ({why})"),
            None => "paused".to_owned(),
        }
    } else if offer.idle == 0 {
        "busy".to_owned()
    } else {
        "giving".to_owned()
    }
}

/// The table: a header, then one row per peer.
fn rows(peers: &[PeerView]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "PEER".to_owned(),
        "RTT".to_owned(),
        "STATE".to_owned(),
        "IDLE/CORES".to_owned(),
        "QUEUED".to_owned(),
        "ADDRESS".to_owned(),
    ]];
    for p in peers {
        let (state, cores, queued) = match &p.offer {
            // A paused peer offers no cores now: "0/0" would read as a
            // peer with none at all.
            Some(o) if o.cores == 0 => (offer_state(o), "-".to_owned(), o.queued.to_string()),
            Some(o) => (
                offer_state(o),
                format!("{}/{}", o.idle, o.cores),
                o.queued.to_string(),
            ),
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        // Why a peer that offers free cores may not get the next task.
        let state = match &p.failures {
            Some(f) => {
                let failed = format!(
                    "failed {} task{} lately",
                    f.count,
                    if f.count == 1 { "" } else { "s" }
                );
                if p.offer.is_some() {
                    format!("{state}, {failed}")
                } else {
                    failed
                }
            }
            None => state,
        };
        rows.push(vec![
            p.peer_id.clone(),
            p.rtt_ms
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            state,
            cores,
            queued,
            // The peer id is in the first column already.
            p.addrs
                .first()
                .map(|addr| {
                    addr.strip_suffix(&format!("/p2p/{}", p.peer_id))
                        .unwrap_or(addr)
                        .to_owned()
                })
                .unwrap_or_default(),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, offer: Option<(u16, u16)>) -> PeerView {
        paused_peer(id, offer, None)
    }

    fn paused_peer(id: &str, offer: Option<(u16, u16)>, why: Option<&str>) -> PeerView {
        PeerView {
            peer_id: id.into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            agent: None,
            rtt_ms: Some(1.25),
            connected_ms: 0,
            offer: offer.map(|(idle, cores)| OfferView {
                cores,
                idle,
                queued: 0,
                memory: 1 << 30,
                runtimes: vec!["wasm".into()],
                age_ms: 0,
                paused: why.map(Into::into),
            }),
            failures: None,
        }
    }

    #[test]
    fn an_address_is_shown_without_the_peer_id_it_ends_in() {
        let mut with_id = peer("id1", None);
        with_id.addrs = vec!["/ip4/10.0.0.2/tcp/4001/p2p/id1".into()];
        let table = rows(&[with_id, peer("id2", None)]);
        assert_eq!(table[1][5], "/ip4/10.0.0.2/tcp/4001");
        assert_eq!(table[2][5], "/ip4/127.0.0.1/tcp/4001");
    }

    #[test]
    fn peers_show_whether_a_host_is_paused_or_busy() {
        let table = rows(&[
            peer("paused", Some((0, 0))),
            paused_peer("away", Some((0, 0)), Some("owner active")),
            peer("busy", Some((0, 2))),
            peer("giving", Some((1, 2))),
            peer("silent", None),
        ]);
        assert_eq!(table[0][2], "STATE");
        let states: Vec<(&str, &str, &str)> = table[1..]
            .iter()
            .map(|r| (r[0].as_str(), r[2].as_str(), r[3].as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("paused", "paused", "-"),
                ("away", "paused (owner active)", "-"),
                ("busy", "busy", "0/2"),
                ("giving", "giving", "1/2"),
                ("silent", "-", "-"),
            ]
        );
        assert!(table.iter().all(|r| r.len() == table[0].len()));
    }

    #[test]
    fn peers_that_failed_our_tasks_say_so() {
        let mut flaky = peer("flaky", Some((2, 2)));
        flaky.failures = Some(spare_node::api::types::FailuresView {
            count: 2,
            forgotten_in_ms: 240_000,
        });
        let mut once = peer("once", None);
        once.failures = Some(spare_node::api::types::FailuresView {
            count: 1,
            forgotten_in_ms: 1,
        });
        let table = rows(&[flaky, once]);
        assert_eq!(table[1][2], "giving, failed 2 tasks lately");
        assert_eq!(table[2][2], "failed 1 task lately");
    }
}
