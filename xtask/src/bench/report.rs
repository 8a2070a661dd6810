//! The result of one run: JSON (one file per run), target checks (PASS/MISS, said plainly),
//! the markdown section of docs/benchmarks.md and its SVG chart.

use std::fmt::Write as _;

use serde::Serialize;

use super::dockerd::DockerTimings;
use super::measure::Metric;
use super::stats::{Summary, paired_ratios, percentile, slow_flags};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cores: usize,
    pub(crate) kernel: String,
    pub(crate) loadavg_before: String,
    pub(crate) loadavg_after: String,
    pub(crate) iperf3: String,
    pub(crate) sockperf: String,
    pub(crate) git_commit: String,
}

/// One metric of one topology over the repetitions (index = repetition).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Series {
    pub(crate) metric: Metric,
    pub(crate) values: Vec<Option<f64>>,
    pub(crate) errors: Vec<Option<String>>,
    pub(crate) slow: Vec<bool>,
    pub(crate) summary: Option<Summary>,
    /// value ÷ bare veth's value of the same repetition.
    pub(crate) ratio_to_bare: Option<Summary>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopologyResult {
    pub(crate) id: String,
    pub(crate) description: String,
    /// Why it did not run (not in this build, or its set-up failed).
    pub(crate) unavailable: Option<String>,
    pub(crate) series: Vec<Series>,
}

impl TopologyResult {
    pub(crate) fn series(&self, m: Metric) -> Option<&Series> {
        self.series.iter().find(|s| s.metric == m)
    }
}

/// CreateEndpoint + Join on a daemon whose warm link pool (`--link-pool`) is sized to the
/// burst: a second daemon, after the default one's row and RSS.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SizedPool {
    /// The daemon's `--link-pool`.
    pub(crate) link_pool: usize,
    /// Spare links in its pool when the burst started.
    pub(crate) spares: usize,
    pub(crate) create_join_ms: Vec<f64>,
    pub(crate) create_join_p50_ms: Option<f64>,
    pub(crate) create_join_p99_ms: Option<f64>,
    pub(crate) errors: Vec<String>,
}

/// The daemon's default `--link-pool` (plugin/src/daemon.rs), as the report names it.
pub(crate) const DEFAULT_LINK_POOL: usize = 8;

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Control {
    pub(crate) callers: usize,
    pub(crate) endpoints: usize,
    /// Spare links in the default daemon's pool when its burst started.
    pub(crate) spares: usize,
    /// `create_join_*`: the daemon with its default `--link-pool` ([`DEFAULT_LINK_POOL`]).
    pub(crate) create_join_ms: Vec<f64>,
    pub(crate) create_join_p50_ms: Option<f64>,
    pub(crate) create_join_p99_ms: Option<f64>,
    pub(crate) policy_entries: usize,
    pub(crate) policy_apply_s: Option<f64>,
    pub(crate) rss_mib: Option<f64>,
    pub(crate) errors: Vec<String>,
    /// The same burst with the pool sized to it.
    pub(crate) sized_pool: Option<SizedPool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) enum Status {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "MISS")]
    Miss,
    #[serde(rename = "NOT MEASURED")]
    NotMeasured,
}

impl Status {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Miss => "MISS",
            Self::NotMeasured => "NOT MEASURED",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) measured: Option<f64>,
    /// `>= x` or `<= x`.
    pub(crate) want: String,
    pub(crate) status: Status,
    pub(crate) note: String,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Run {
    pub(crate) command: String,
    pub(crate) started: String,
    pub(crate) quick: bool,
    pub(crate) repetitions: usize,
    pub(crate) seconds_per_sample: u32,
    pub(crate) machine: Machine,
    pub(crate) topologies: Vec<TopologyResult>,
    pub(crate) control: Option<Control>,
    /// `docker run` / `docker network connect` with a private dockerd (suite `docker`).
    pub(crate) docker: Option<DockerTimings>,
    pub(crate) not_measured: Vec<String>,
    pub(crate) targets: Vec<Target>,
}

/// Builds a series from raw samples, with slow flags, summary and ratios to `bare`.
pub(crate) fn series(
    metric: Metric,
    values: Vec<Option<f64>>,
    errors: Vec<Option<String>>,
    bare: Option<&[Option<f64>]>,
) -> Series {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    let ratio_to_bare = bare.and_then(|b| Summary::of(&paired_ratios(&values, b)));
    let mut slow = slow_flags(&values);
    if !metric.higher_is_better() {
        // For latency a slow sample is a large one.
        let inv: Vec<Option<f64>> = values.iter().map(|v| v.map(|v| 1.0 / v)).collect();
        slow = slow_flags(&inv);
    }
    Series {
        metric,
        summary: Summary::of(&present),
        values,
        errors,
        slow,
        ratio_to_bare,
    }
}

fn values<'a>(run: &'a Run, id: &str, m: Metric) -> Option<&'a [Option<f64>]> {
    run.topologies
        .iter()
        .find(|t| t.id == id && t.unavailable.is_none())
        .and_then(|t| t.series(m))
        .map(|s| s.values.as_slice())
}

fn paired_median(run: &Run, a: &str, b: &str, m: Metric) -> Option<f64> {
    let r = paired_ratios(values(run, a, m)?, values(run, b, m)?);
    Summary::of(&r).map(|s| s.median)
}

fn check(name: &str, measured: Option<f64>, at_least: bool, bound: f64, note: &str) -> Target {
    let status = match measured {
        None => Status::NotMeasured,
        Some(v) if (at_least && v >= bound) || (!at_least && v <= bound) => Status::Pass,
        Some(_) => Status::Miss,
    };
    Target {
        name: name.to_owned(),
        measured,
        want: format!("{} {bound}", if at_least { ">=" } else { "<=" }),
        status,
        note: note.to_owned(),
    }
}

/// The issue's targets, checked against this run (medians of ratios paired by repetition).
pub(crate) fn targets(run: &Run) -> Vec<Target> {
    let few = if run.repetitions < 5 {
        format!(
            " ({} repetitions: fewer than the 5 the target asks for, indicative only)",
            run.repetitions
        )
    } else {
        String::new()
    };
    let cp = run.control.as_ref();
    let docker_run = run.docker.as_ref().and_then(DockerTimings::worst_run_ratio);
    let docker_note = match (&run.docker, docker_run) {
        (None, _) => " not measured: suite `docker` did not run".to_owned(),
        (Some(_), None) => " not measured: the docker suite failed (see errors)".to_owned(),
        (Some(d), Some((_, n))) => format!(
            " (median of {} paired repetitions; the worst of {} existing endpoints: {n})",
            d.repetitions,
            d.levels
                .iter()
                .map(|l| l.endpoints.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ),
    };
    vec![
        check(
            "sluice bridge 10k entries, UDP 64 B pps ÷ bare veth",
            paired_median(run, "sluice-bridge-10k", "bare-veth", Metric::UdpPps),
            true,
            0.85,
            &few,
        ),
        check(
            "sluice bridge 10k entries, UDP 64 B pps ÷ Docker bridge 1k rules",
            paired_median(run, "sluice-bridge-10k", "docker-bridge-1k", Metric::UdpPps),
            true,
            4.0,
            &few,
        ),
        check(
            "sluice bridge 10k entries, TCP_RR ÷ bare veth",
            paired_median(run, "sluice-bridge-10k", "bare-veth", Metric::TcpRr),
            true,
            0.85,
            &few,
        ),
        check(
            "per-packet cost, 100k entries ÷ 1k entries (pps 1k ÷ pps 100k)",
            paired_median(
                run,
                "sluice-bridge-1k",
                "sluice-bridge-100k",
                Metric::UdpPps,
            ),
            false,
            1.05,
            &few,
        ),
        check(
            "sluice VXLAN with policy ÷ plain kernel VXLAN, pps",
            paired_median(run, "sluice-vxlan", "kernel-vxlan", Metric::UdpPps),
            true,
            0.95,
            &few,
        ),
        check(
            "`docker run` to a reachable container, sluice ÷ Docker bridge",
            docker_run.map(|(r, _)| r),
            false,
            1.1,
            &docker_note,
        ),
        check(
            &format!(
                "CreateEndpoint + Join p99 with 50 concurrent callers, ms (default --link-pool {DEFAULT_LINK_POOL})"
            ),
            cp.and_then(|c| c.create_join_p99_ms),
            false,
            10.0,
            "",
        ),
        check(
            &format!(
                "CreateEndpoint + Join p99 with 50 concurrent callers, ms (--link-pool {}: pool sized to the burst)",
                cp.and_then(|c| c.sized_pool.as_ref())
                    .map_or(0, |p| p.link_pool)
            ),
            cp.and_then(|c| c.sized_pool.as_ref())
                .and_then(|p| p.create_join_p99_ms),
            false,
            10.0,
            "",
        ),
        check(
            "daemon RSS with 1,000 endpoints and 100k policy entries, MiB (the issue's 40 MB)",
            cp.and_then(|c| c.rss_mib),
            false,
            // 40 MB = 40e6 bytes = 38.15 MiB, rounded down.
            38.1,
            "",
        ),
    ]
}

/// p50/p99 of latencies.
pub(crate) fn p50_p99(ms: &[f64]) -> (Option<f64>, Option<f64>) {
    (percentile(ms, 50.0), percentile(ms, 99.0))
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The generated markdown section.
pub(crate) fn markdown(run: &Run, chart: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Datapath and control plane, side by side\n");
    let _ = writeln!(s, "```sh\n{}\n```\n", run.command);
    let m = &run.machine;
    let _ = writeln!(
        s,
        "Run {}: {} × {} s per sample{}, topologies interleaved round-robin. Machine: {} \
         ({} cores), kernel {}, {}, {}; commit {}. Load average before: {}; after: {}.\n",
        run.started,
        run.repetitions,
        run.seconds_per_sample,
        if run.quick { " (`--quick`)" } else { "" },
        m.cpu_model,
        m.cores,
        m.kernel,
        m.iperf3,
        m.sockperf,
        m.git_commit,
        m.loadavg_before,
        m.loadavg_after
    );
    let _ = writeln!(
        s,
        "Each cell: median over the repetitions, then in parentheses the median ratio to the \
         bare veth pair of the same repetition with its min–max. Samples below {:.0} % of \
         their topology's median are slow and counted in the last column.\n",
        super::stats::SLOW_FRACTION * 100.0
    );
    if !run.topologies.is_empty() {
        datapath_markdown(&mut s, run, chart);
    }
    if let Some(c) = &run.control {
        let _ = writeln!(s, "### Control plane\n");
        let _ = writeln!(
            s,
            "- CreateEndpoint + Join over the plugin socket, {} concurrent callers, {} \
             endpoints, daemon with its default `--link-pool {DEFAULT_LINK_POOL}` ({} spare \
             links when the burst started): p50 {} ms, p99 {} ms.",
            c.callers,
            c.endpoints,
            c.spares,
            c.create_join_p50_ms.map_or("–".into(), fmt_num),
            c.create_join_p99_ms.map_or("–".into(), fmt_num)
        );
        if let Some(p) = &c.sized_pool {
            let _ = writeln!(
                s,
                "- The same burst on a second daemon started with `--link-pool {}` (the pool \
                 sized to the burst; {} spare links when it started): p50 {} ms, p99 {} ms.",
                p.link_pool,
                p.spares,
                p.create_join_p50_ms.map_or("–".into(), fmt_num),
                p.create_join_p99_ms.map_or("–".into(), fmt_num)
            );
            for e in &p.errors {
                let _ = writeln!(s, "- error (`--link-pool {}`): {e}", p.link_pool);
            }
        }
        let _ = writeln!(
            s,
            "- Applying a policy of {} CIDR entries with those endpoints attached: {} s; \
             daemon RSS afterwards: {} MiB.",
            c.policy_entries,
            c.policy_apply_s.map_or("–".into(), fmt_num),
            c.rss_mib.map_or("–".into(), fmt_num)
        );
        for e in &c.errors {
            let _ = writeln!(s, "- error: {e}");
        }
        let _ = writeln!(s);
    }
    if let Some(d) = &run.docker {
        docker_markdown(&mut s, d);
    }
    if !run.not_measured.is_empty() {
        let _ = writeln!(s, "Not measured in this run:\n");
        for n in &run.not_measured {
            let _ = writeln!(s, "- {n}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "### Targets\n\n| target | measured | wanted | result |");
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for t in &run.targets {
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | **{}** |",
            t.name,
            t.note,
            t.measured.map_or("–".into(), fmt_num),
            t.want,
            t.status.as_str()
        );
    }
    s
}

/// The datapath table and chart.
fn datapath_markdown(s: &mut String, run: &Run, chart: &str) {
    let _ = write!(s, "| topology |");
    for metric in Metric::ALL {
        let _ = write!(s, " {} |", metric.label());
    }
    let _ = writeln!(s, " slow samples |");
    let _ = writeln!(s, "| --- |{} --- |", " --- |".repeat(Metric::ALL.len()));
    for t in &run.topologies {
        if let Some(why) = &t.unavailable {
            let _ = writeln!(
                s,
                "| {} | not run: {why} |{}",
                t.description,
                " |".repeat(Metric::ALL.len())
            );
            continue;
        }
        let _ = write!(s, "| {} |", t.description);
        let mut slow = 0;
        for metric in Metric::ALL {
            match t.series(metric) {
                Some(se) => {
                    slow += se.slow.iter().filter(|f| **f).count();
                    let scale = metric.display_scale();
                    let v = se
                        .summary
                        .map_or("failed".into(), |x| fmt_num(x.median * scale));
                    let r = se.ratio_to_bare.map_or(String::new(), |r| {
                        format!(" ({:.2}x, {:.2}–{:.2})", r.median, r.min, r.max)
                    });
                    let _ = write!(s, " {v}{r} |");
                }
                None => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let _ = writeln!(s, " {slow} |");
    }
    let _ = writeln!(
        s,
        "\n![UDP 64 B pps and TCP_RR as a ratio to bare veth]({chart})\n"
    );
}

/// The `docker run` / `docker network connect` table.
fn docker_markdown(s: &mut String, d: &DockerTimings) {
    let _ = writeln!(
        s,
        "### `docker run` and `docker network connect`, sluice vs Docker's bridge driver\n"
    );
    let _ = writeln!(
        s,
        "Private dockerd {}, {} repetitions per cell, drivers alternating; \"answers\": {}. \
         Milliseconds p50 / p90 / p99; the ratio is sluice ÷ bridge paired by repetition, \
         median (min–max).\n",
        d.dockerd_version, d.repetitions, d.answers
    );
    let _ = writeln!(
        s,
        "| operation | endpoints on the network | sluice ms | Docker bridge ms | sluice ÷ bridge |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    let cell = |l: &super::dockerd::Latency| {
        let f = |v: Option<f64>| v.map_or("–".into(), fmt_num);
        let failed = l.errors.iter().flatten().count();
        let failed = if failed > 0 {
            format!(" ({failed} failed)")
        } else {
            String::new()
        };
        format!(
            "{} / {} / {}{failed}",
            f(l.p50_ms),
            f(l.p90_ms),
            f(l.p99_ms)
        )
    };
    for level in &d.levels {
        for op in &level.ops {
            let what = if op.op == "run" {
                "`docker run -d --network X`"
            } else {
                "`docker network connect X`"
            };
            let ratio = op.ratio.map_or("–".into(), |r| {
                format!("{:.2}x ({:.2}–{:.2})", r.median, r.min, r.max)
            });
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} | {ratio} |",
                level.endpoints,
                cell(&op.sluice),
                cell(&op.bridge)
            );
        }
    }
    let _ = writeln!(s);
    if !d.plugin_calls.is_empty() {
        let _ = writeln!(
            s,
            "Where sluice's time goes: each plugin call as sluice's log times it (span busy + \
             idle, the timed containers' calls only), and the Engine API identity lookup, \
             which runs after `Join`, outside the calls:\n"
        );
        let _ = writeln!(s, "| call | count | p50 ms | p90 ms | max ms |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
        let f = |v: Option<f64>| v.map_or("–".into(), fmt_num);
        for c in &d.plugin_calls {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                c.call,
                c.count,
                f(c.p50_ms),
                f(c.p90_ms),
                f(c.max_ms)
            );
        }
        let _ = writeln!(s);
    }
    let failed_samples = d
        .levels
        .iter()
        .flat_map(|l| &l.ops)
        .flat_map(|o| [&o.sluice, &o.bridge])
        .filter_map(|l| l.errors.iter().flatten().next())
        .take(3);
    let notes: Vec<String> = d
        .errors
        .iter()
        .map(|e| format!("- error: {e}"))
        .chain(failed_samples.map(|e| format!("- failed sample: {e}")))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "{}\n", notes.join("\n"));
    }
}

/// Begin and end markers of the generated section in docs/benchmarks.md.
pub(crate) const BEGIN: &str = "<!-- cargo xtask bench: generated section begins -->";
pub(crate) const END: &str = "<!-- cargo xtask bench: generated section ends -->";

/// `doc` with the generated section replaced by `section` (appended when absent).
pub(crate) fn splice(doc: &str, section: &str) -> String {
    let block = format!("{BEGIN}\n{section}{END}\n");
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let after = doc[e + END.len()..].trim_start_matches('\n');
            format!("{}{block}{after}", &doc[..b])
        }
        _ => format!("{}\n{block}", doc.trim_end()),
    }
}

/// The SVG chart: UDP pps and TCP_RR ratio to bare veth (median, with min–max whiskers).
pub(crate) fn chart_svg(run: &Run) -> anyhow::Result<String> {
    use plotters::prelude::*;
    let rows: Vec<(&TopologyResult, Option<Summary>, Option<Summary>)> = run
        .topologies
        .iter()
        .filter(|t| t.unavailable.is_none())
        .map(|t| {
            (
                t,
                t.series(Metric::UdpPps).and_then(|s| s.ratio_to_bare),
                t.series(Metric::TcpRr).and_then(|s| s.ratio_to_bare),
            )
        })
        .collect();
    let mut svg = String::new();
    {
        let height = 60 + 44 * u32::try_from(rows.len()).unwrap_or(20);
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = rows.len().max(1);
        let xmax = rows
            .iter()
            .flat_map(|(_, a, b)| [a.map(|s| s.max), b.map(|s| s.max)])
            .flatten()
            .fold(1.2_f64, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(330)
            .caption(
                "ratio to bare veth (median, min–max): UDP 64 B pps (blue), TCP_RR (orange)",
                ("sans-serif", 16),
            )
            .build_cartesian_2d(0f64..xmax, 0f64..ymax as f64)?;
        let labels: Vec<String> = rows.iter().map(|(t, _, _)| t.description.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(ymax)
            .y_label_formatter(&|y| {
                let i = y.floor();
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "row index, small and non-negative"
                )]
                let i = i as usize;
                labels.get(i).cloned().unwrap_or_default()
            })
            .draw()?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        for (i, (_, udp, rr)) in rows.iter().enumerate() {
            let y = i as f64;
            for (s, off, color) in [(udp, 0.15, blue), (rr, 0.5, orange)] {
                if let Some(s) = s {
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(0.0, y + off), (s.median, y + off + 0.3)],
                        color.filled(),
                    )))?;
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(s.min, y + off + 0.15), (s.max, y + off + 0.15)],
                        BLACK.stroke_width(2),
                    )))?;
                }
            }
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            cpu_model: "cpu".into(),
            cores: 2,
            kernel: "6.18".into(),
            loadavg_before: "0.1".into(),
            loadavg_after: "0.2".into(),
            iperf3: "iperf3".into(),
            sockperf: "sockperf".into(),
            git_commit: "abc".into(),
        }
    }

    fn topo(id: &str, udp: &[f64], rr: &[f64], bare: Option<(&[f64], &[f64])>) -> TopologyResult {
        let o = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let bu = bare.map(|b| o(b.0));
        let br = bare.map(|b| o(b.1));
        TopologyResult {
            id: id.into(),
            description: id.into(),
            unavailable: None,
            series: vec![
                series(Metric::UdpPps, o(udp), vec![None; udp.len()], bu.as_deref()),
                series(Metric::TcpRr, o(rr), vec![None; rr.len()], br.as_deref()),
            ],
        }
    }

    fn run() -> Run {
        let bare_u = [200e3, 100e3, 210e3, 190e3, 205e3];
        let bare_r = [18e3, 9e3, 18e3, 17e3, 18e3];
        let b = Some((&bare_u[..], &bare_r[..]));
        let mut r = Run {
            command: "cargo xtask bench".into(),
            started: "now".into(),
            quick: false,
            repetitions: 5,
            seconds_per_sample: 3,
            machine: machine(),
            topologies: vec![
                topo("bare-veth", &bare_u, &bare_r, b),
                topo(
                    "docker-bridge-1k",
                    &[40e3, 20e3, 42e3, 38e3, 41e3],
                    &[6e3; 5],
                    b,
                ),
                // 0.9x bare in every repetition, including the slow one.
                topo(
                    "sluice-bridge-10k",
                    &[180e3, 90e3, 189e3, 171e3, 184.5e3],
                    &[15e3, 7.5e3, 15e3, 14e3, 15e3],
                    b,
                ),
                topo("sluice-bridge-1k", &[180e3; 5], &[15e3; 5], b),
                topo("sluice-bridge-100k", &[170e3; 5], &[15e3; 5], b),
            ],
            control: Some(Control {
                create_join_p99_ms: Some(12.0),
                rss_mib: Some(20.0),
                sized_pool: Some(SizedPool {
                    link_pool: 1000,
                    create_join_p99_ms: Some(9.0),
                    ..SizedPool::default()
                }),
                ..Control::default()
            }),
            docker: None,
            not_measured: vec![],
            targets: vec![],
        };
        r.targets = targets(&r);
        r
    }

    #[test]
    fn targets_are_checked_on_paired_ratios() {
        let r = run();
        let t = &r.targets;
        assert_eq!(t[0].status, Status::Pass, "{:?}", t[0]);
        assert!((t[0].measured.unwrap() - 0.9).abs() < 0.01);
        assert_eq!(t[1].status, Status::Pass); // 4.5x Docker with 1k rules
        assert_eq!(t[3].status, Status::Miss); // 180/170 = 1.059 > 1.05
        assert_eq!(t[4].status, Status::NotMeasured); // no sluice VXLAN
        assert_eq!(t[6].status, Status::Miss); // p99 12 ms, default pool
        assert!(t[6].name.contains("default --link-pool 8"), "{}", t[6].name);
        assert_eq!(t[7].status, Status::Pass); // p99 9 ms, pool sized to the burst
        assert!(t[7].name.contains("--link-pool 1000"), "{}", t[7].name);
        assert_eq!(t[8].status, Status::Pass);
    }

    #[test]
    fn docker_run_target_takes_the_worst_endpoint_count_and_renders() {
        use super::super::dockerd::{Level, OpTiming};
        let mut r = run();
        assert_eq!(r.targets[5].status, Status::NotMeasured);
        let ratio = |m: f64| {
            Some(Summary {
                median: m,
                min: m,
                max: m,
                n: 3,
            })
        };
        let level = |endpoints: usize, run_ratio: f64| Level {
            endpoints,
            ops: vec![
                OpTiming {
                    op: "run".into(),
                    ratio: ratio(run_ratio),
                    ..OpTiming::default()
                },
                OpTiming {
                    op: "connect".into(),
                    ratio: ratio(2.0),
                    ..OpTiming::default()
                },
            ],
        };
        r.docker = Some(DockerTimings {
            repetitions: 3,
            levels: vec![level(0, 1.05), level(100, 1.08)],
            ..DockerTimings::default()
        });
        r.targets = targets(&r);
        assert_eq!(r.targets[5].status, Status::Pass, "{:?}", r.targets[5]);
        assert_eq!(r.targets[5].measured, Some(1.08));
        assert!(r.targets[5].note.contains("100"), "{}", r.targets[5].note);
        let md = markdown(&r, "c.svg");
        assert!(md.contains("| `docker network connect X` | 100 |"), "{md}");
        assert!(md.contains("1.08x"), "{md}");
        r.docker.as_mut().unwrap().levels[1].ops[0].ratio = ratio(1.2);
        r.targets = targets(&r);
        assert_eq!(r.targets[5].status, Status::Miss);
    }

    #[test]
    fn slow_repetition_is_flagged() {
        let r = run();
        let bare = r.topologies[0].series(Metric::UdpPps).unwrap();
        assert_eq!(bare.slow, vec![false, true, false, false, false]);
    }

    #[test]
    fn json_and_markdown_render() {
        let r = run();
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["targets"][0]["status"], "PASS");
        assert_eq!(j["topologies"][0]["series"][0]["metric"], "udp_pps");
        let md = markdown(&r, "bench.svg");
        assert!(md.contains("cargo xtask bench"));
        assert!(md.contains("**MISS**"));
        assert!(md.contains("| sluice-bridge-10k | 180 (0.90x"));
    }

    #[test]
    fn splice_replaces_only_the_generated_section() {
        let doc = "# B\n\nmicro text\n";
        let once = splice(doc, "one\n");
        assert!(once.starts_with("# B\n\nmicro text\n"));
        assert!(once.contains("one\n"));
        let twice = splice(&once, "two\n");
        assert!(!twice.contains("one\n"));
        assert!(twice.contains("two\n"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
    }

    #[test]
    fn chart_is_an_svg() {
        let svg = chart_svg(&run()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("sluice-bridge-10k"));
    }
}
