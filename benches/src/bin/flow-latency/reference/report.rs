//! The reference comparison's tables: ratios to nginx, per-round ratios, the floors, the UDP
//! counters of the bulk rows, and the JSON of it all.

use super::super::udp_counters::UdpCounts;
use super::super::{Spread, quinn_echo};
use super::{CLIENT, FORWARD, NGINX, NGINX_LARGE, Net, PerRow, Plan, QuinnTally, ROWS, Samples};

/// The ratio of `row`'s median to nginx's within each round (`per_round` samples of each row per
/// round, in order), over the rounds: median, min, max. Rows of one round run moments apart, so
/// this ratio holds still when the machine's load moves both between rounds.
fn per_round_ratio(rows: &PerRow, row: usize, per_round: usize) -> Option<(f64, f64, f64)> {
    let rounds = rows[row]
        .chunks(per_round)
        .zip(rows[NGINX].chunks(per_round));
    let ratios: Vec<f64> = rounds
        .map(|(this, nginx)| Spread::of(this.to_vec()).median / Spread::of(nginx.to_vec()).median)
        .collect();
    let min = ratios.iter().copied().reduce(f64::min)?;
    let max = ratios.iter().copied().reduce(f64::max)?;
    Some((horde_benches::median(ratios), min, max))
}

/// One table: every row's median, p99 and ratio to nginx (of the medians over every round, and
/// the median of the rounds' own ratios), with the targets' notes. `per_round`: samples of each
/// row per round.
fn table(
    title: &str,
    unit: &str,
    rows: PerRow,
    per_round: usize,
    nginx: bool,
    targets: &[(usize, &str)],
) -> serde_json::Value {
    println!("  -- {title}");
    let round_ratios: Vec<_> = (0..rows.len())
        .map(|row| per_round_ratio(&rows, row, per_round))
        .collect();
    let spreads: Vec<Spread> = rows.into_iter().map(Spread::of).collect();
    let base = spreads[NGINX].median;
    let mut json = serde_json::Map::new();
    for (row, spread) in spreads.iter().enumerate() {
        if spread.median.is_nan() {
            continue;
        }
        let ratio = spread.median / base;
        let target = targets
            .iter()
            .find(|(r, _)| *r == row)
            .map_or("", |(_, t)| *t);
        let (ratio_text, round_text) = match round_ratios[row] {
            Some((median, min, max)) if nginx => (
                format!("{ratio:.2}x nginx"),
                format!("per round {median:.2}x [{min:.2}-{max:.2}]"),
            ),
            _ => (String::new(), String::new()),
        };
        println!(
            "    {:<16} {:>9.3} {unit} [{:.3}-{:.3}] p99 {:.3}  {ratio_text:<12} {round_text:<28} \
             {target}",
            ROWS[row], spread.median, spread.min, spread.max, spread.p99
        );
        let mut value = spread.json();
        value["ratio_to_nginx"] = serde_json::json!(ratio);
        if let Some((median, min, max)) = round_ratios[row] {
            value["ratio_to_nginx_per_round"] =
                serde_json::json!({"median": median, "min": min, "max": max});
        }
        json.insert(ROWS[row].to_owned(), value);
    }
    serde_json::Value::Object(json)
}

/// The floor: the bare quinn echo's rows, with what they are read against.
struct Floor {
    rows: Vec<Spread>,
    nginx_keep_alive: f64,
    nginx_websocket: f64,
    /// The horde rows' medians: forward keep-alive, Rust client keep-alive, forward WebSocket.
    horde: [(&'static str, f64); 3],
}

impl Floor {
    fn of(samples: &Samples) -> Self {
        let median = |values: &[f64]| Spread::of(values.to_vec()).median;
        Self {
            rows: samples.quinn_echo.iter().cloned().map(Spread::of).collect(),
            nginx_keep_alive: median(&samples.keep_alive[NGINX]),
            nginx_websocket: median(&samples.websocket[NGINX]),
            horde: [
                ("forward keep-alive", median(&samples.keep_alive[FORWARD])),
                ("client keep-alive", median(&samples.keep_alive[CLIENT])),
                ("forward WS echo", median(&samples.websocket[FORWARD])),
            ],
        }
    }

    /// Prints each row against nginx's WebSocket echo, with the horde rows over it; its JSON.
    fn print(&self, nginx: bool) -> serde_json::Value {
        println!(
            "  -- floor: bare quinn echo, 32 B on one open stream, both ends in this process \
             (horde's TLS and transport config)"
        );
        let mut json = serde_json::Map::new();
        for (row, spread) in quinn_echo::ROWS.iter().zip(&self.rows) {
            let over: Vec<String> = self
                .horde
                .iter()
                .map(|(name, value)| format!("{name} {:.1}x", value / spread.median))
                .collect();
            let ratio = if nginx {
                format!("{:.2}x nginx WS", spread.median / self.nginx_websocket)
            } else {
                String::new()
            };
            println!(
                "    {row:<16} {:>9.3} ms [{:.3}-{:.3}] p99 {:.3}  {ratio:<14} ({})",
                spread.median,
                spread.min,
                spread.max,
                spread.p99,
                over.join(", ")
            );
            json.insert((*row).to_owned(), spread.json());
        }
        serde_json::Value::Object(json)
    }
}

/// Prints the Rust client's rows from `horde_node::client::one_thread_runtime` (one thread that
/// spins before it sleeps), against nginx with the target; their JSON.
fn one_thread_client_rows(rows: &[Vec<f64>; 2], floor: &Floor, nginx: bool) -> serde_json::Value {
    println!(
        "  -- Rust client on horde's one-thread runtime (client::one_thread_runtime: one thread, as the TLS client; spinning unless HORDE_SPIN_US=0)"
    );
    let mut json = serde_json::Map::new();
    for (((name, trips), base), target) in ["keep-alive GET /health", "WebSocket echo, 32 B"]
        .iter()
        .zip(rows)
        .zip([floor.nginx_keep_alive, floor.nginx_websocket])
        .zip(["  target <= 1.0x", ""])
    {
        let spread = Spread::of(trips.clone());
        let ratio = if nginx {
            format!("{:.2}x nginx{target}", spread.median / base)
        } else {
            String::new()
        };
        println!(
            "    {name:<24} {:>9.3} ms [{:.3}-{:.3}] p99 {:.3}  {ratio}",
            spread.median, spread.min, spread.max, spread.p99
        );
        json.insert((*name).to_owned(), spread.json());
    }
    serde_json::Value::Object(json)
}

/// Prints the bulk rows' UDP counters (buffer errors, datagrams per GiB in each namespace, the
/// Rust client's quinn counts) and adds them to the rows' JSON.
fn print_bulk_udp(
    plan: &Plan,
    net: &Net<'_>,
    bulk_udp: &[UdpCounts; 5],
    quinn: &QuinnTally,
    bulk: &mut serde_json::Value,
) {
    println!(
        "    UDP errors during each row's transfers, all rounds: RcvbufErrors (clients' side) / \
         SndbufErrors (servers' side): {}",
        ROWS.iter()
            .zip(bulk_udp)
            .map(|(row, errors)| format!(
                "{row} {} / {}",
                errors.receive_buffer, errors.send_buffer
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Datagrams per GiB moved: on loopback the one namespace counts both ends.
    let gib = (plan.rounds as f64 * plan.size as f64 / f64::from(1u32 << 30)).max(1e-9);
    let per_gib = |count: u64| (count as f64 / gib).round();
    println!(
        "    UDP datagrams per GiB, clients' namespace in / out{}: {}",
        if net.pair.is_some() {
            ", servers' in / out"
        } else {
            ""
        },
        ROWS.iter()
            .zip(bulk_udp)
            .map(|(row, udp)| {
                let mut cell = format!(
                    "{row} {} / {}",
                    per_gib(udp.in_datagrams),
                    per_gib(udp.out_datagrams)
                );
                if net.pair.is_some() {
                    cell += &format!(", {} / {}", per_gib(udp.server_in), per_gib(udp.server_out));
                }
                cell
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "    Rust client's connection per GiB (quinn's counts): {} datagrams in ({} receive \
         events), {} out ({} sends); path MTU {}",
        per_gib(quinn.rx_datagrams),
        per_gib(quinn.rx_ios),
        per_gib(quinn.tx_datagrams),
        per_gib(quinn.tx_ios),
        quinn.mtu
    );
    for (row, errors) in ROWS.iter().zip(bulk_udp) {
        if let Some(value) = bulk.get_mut(*row) {
            value["udp_rcvbuf_errors"] = serde_json::json!(errors.receive_buffer);
            value["udp_sndbuf_errors"] = serde_json::json!(errors.send_buffer);
            value["udp_datagrams_per_gib"] = serde_json::json!({
                "clients_in": per_gib(errors.in_datagrams),
                "clients_out": per_gib(errors.out_datagrams),
                "servers_in": per_gib(errors.server_in),
                "servers_out": per_gib(errors.server_out),
            });
        }
    }
}

/// Prints the comparison; its JSON.
pub(crate) fn report(plan: Plan, net: &Net<'_>, samples: Samples) -> serde_json::Value {
    println!(
        "== against the reference's path: nginx mutual TLS in front of the job, {} ({} rounds, \
         rows alternating; {} requests per row and round; median [min-max] p99; ratios to nginx \
         with default buffers; load average {})",
        net.describe(),
        plan.rounds,
        plan.requests,
        horde_benches::load_average()
    );
    if !samples.nginx {
        println!("  (no nginx rows: nginx or openssl is missing)");
    }
    let nginx = samples.nginx;
    let floor = Floor::of(&samples);
    let new_connection = table(
        "GET /health, new connection each (TLS: full handshake; Rust client: new stream, receipt verified)",
        "ms",
        samples.new_connection,
        plan.requests,
        nginx,
        &[(FORWARD, "target <= 0.35x")],
    );
    let keep_alive = table(
        "keep-alive GET /health on one connection",
        "ms",
        samples.keep_alive,
        plan.requests,
        nginx,
        &[(FORWARD, "target <= 1.2x"), (CLIENT, "target <= 1.0x")],
    );
    let websocket = table(
        "WebSocket echo, 32 B binary message",
        "ms",
        samples.websocket,
        plan.requests,
        nginx,
        &[(FORWARD, "target <= 1.0x")],
    );
    let one_thread = one_thread_client_rows(&samples.client_one_thread, &floor, nginx);
    let floor = floor.print(nginx);
    let large = Spread::of(samples.bulk[NGINX_LARGE].clone()).median;
    let forward_bulk = Spread::of(samples.bulk[FORWARD].clone()).median;
    let client_bulk = Spread::of(samples.bulk[CLIENT].clone()).median;
    let bulk_udp = samples.bulk_udp;
    let mut bulk = table(
        &format!("bulk GET /bytes, {} MiB (Gbit/s)", plan.size >> 20),
        "Gb/s",
        samples.bulk,
        1,
        nginx,
        &[],
    );
    print_bulk_udp(&plan, net, &bulk_udp, &samples.client_quinn, &mut bulk);
    if nginx {
        println!(
            "    against nginx with 256 KiB buffers: forward {:.2}x (target >= 0.7), Rust client \
             {:.2}x (target >= 0.8)",
            forward_bulk / large,
            client_bulk / large
        );
    }
    let one_thread_bulk = Spread::of(samples.client_one_thread_bulk);
    println!(
        "    Rust client, horde's one-thread runtime {:>9.3} Gb/s [{:.3}-{:.3}]{}",
        one_thread_bulk.median,
        one_thread_bulk.min,
        one_thread_bulk.max,
        if nginx {
            format!(
                "  {:.2}x nginx with 256 KiB buffers",
                one_thread_bulk.median / large
            )
        } else {
            String::new()
        }
    );
    let quinn_bulk = Spread::of(samples.quinn_bulk);
    println!(
        "  -- floor: bare quinn, one stream of {} MiB, both ends in this process (horde's TLS and \
         transport config; {})",
        plan.size >> 20,
        if net.pair.is_some() {
            "the sender in the server's namespace on its runtime, across the veth pair"
        } else {
            "on its 2-worker runtime, loopback"
        }
    );
    println!(
        "    quinn            {:>9.3} Gb/s [{:.3}-{:.3}]  forward {:.2}x, Rust client {:.2}x of it{}",
        quinn_bulk.median,
        quinn_bulk.min,
        quinn_bulk.max,
        forward_bulk / quinn_bulk.median,
        client_bulk / quinn_bulk.median,
        if nginx {
            format!(
                "; it is {:.2}x nginx with 256 KiB buffers",
                quinn_bulk.median / large
            )
        } else {
            String::new()
        }
    );
    println!(
        "  -- one request per process, POST /echo, spawn to exit ({} per round)",
        plan.processes
    );
    let [curl_nginx, curl_direct, request] = samples.processes.map(Spread::of);
    curl_direct.print_ms("curl direct", "plain HTTP to the job");
    if nginx {
        curl_nginx.print_ms("curl nginx", "mutual TLS, full handshake");
    }
    request.print_ms("horde request", "`horde job request`, receipt verified");
    if nginx {
        println!(
            "    horde job request / curl through nginx: {:.2}x (target <= 2)",
            request.median / curl_nginx.median
        );
    }
    serde_json::json!({
        "rounds": plan.rounds, "requests_per_round": plan.requests,
        "new_connection_ms": new_connection, "keep_alive_ms": keep_alive,
        "websocket_echo_ms": websocket, "quinn_echo_floor_ms": floor,
        "rust_client_one_thread_ms": one_thread, "bulk_gbit": bulk,
        "bulk_forward_over_nginx_256k": forward_bulk / large,
        "bulk_client_over_nginx_256k": client_bulk / large,
        "bulk_quinn_floor_gbit": quinn_bulk.json(),
        "bulk_rust_client_one_thread_gbit": one_thread_bulk.json(),
        "process_ms": {"curl_nginx": curl_nginx.json(), "curl_direct": curl_direct.json(),
                       "horde_job_request": request.json()},
    })
}
