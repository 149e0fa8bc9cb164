//! `hush sim`: how much privacy costs in detection power, swept over ε and traffic.
//!
//! The model mode simulates each window's exact histogram and error count (multinomial and
//! binomial draws from the scenario's distributions), adds the noise of both aggregators with the
//! mechanism the aggregators use (prio's discrete Laplace at the same ε and sensitivity), and
//! runs the results service's detectors on the result. It writes one CSV row per run, a summary
//! CSV and markdown table per parameter combination, and PNG plots.

mod coverage;
mod model;
mod pipeline;
mod plot;
mod scenario;
mod tune;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use model::{Cell, RunResult};
use scenario::{AnomalyKind, Scenario};

/// How `hush sim` produces released windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Exact aggregates plus the aggregators' noise mechanism: fast, for sweeps up to 10^7
    /// events per window.
    Model,
    /// The real system in this process (real crypto and servers on loopback): small N only.
    Pipeline,
    /// Runs the scenario's no-anomaly windows in both modes and tests that the released
    /// histograms and error counts agree (exits non-zero if not).
    Check,
    /// Quantile honesty by fleet size: how often each quantile is released or withheld, how
    /// often its interval covers the truth, and the smallest fleet that gets it (model mode;
    /// writes coverage.md).
    Coverage,
    /// Search the per-instance bound, the bucket layout and the pooled detector's windows for
    /// a target (`--target-shift-ms`, `--epsilon`, …) with the model; print the recommended
    /// task and detection settings (writes tune.md and tuned.toml).
    Tune,
}

/// Sweep privacy against detection power and quantile error.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Model (fast), pipeline (the real system) or check (do both agree?).
    #[arg(long, value_enum, default_value = "model")]
    pub(crate) mode: Mode,
    /// The scenario file (TOML); `simulations/scenarios/default.toml` is the shipped one.
    #[arg(long)]
    pub(crate) scenario: PathBuf,
    /// Directory for runs.csv, summary.csv, summary.md and the PNG plots (created).
    #[arg(long, default_value = "sim-out")]
    pub(crate) out: PathBuf,
    /// Override the scenario's repetitions (e.g. for a quick look).
    #[arg(long)]
    pub(crate) repetitions: Option<usize>,
    /// Override the scenario's seed.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Skip the PNG plots.
    #[arg(long)]
    pub(crate) no_plots: bool,
    /// Tune: the p95 shift to catch, ms.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) target_shift_ms: f64,
    /// Tune: ε per window.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) epsilon: f64,
    /// Tune: the power to reach.
    #[arg(long, default_value_t = 0.95)]
    pub(crate) power: f64,
    /// Tune: within this many windows of the shift's start (default: the scenario's
    /// detect_within).
    #[arg(long)]
    pub(crate) within: Option<usize>,
    /// Tune: the false-alarm rate per window (default: the scenario's).
    #[arg(long)]
    pub(crate) false_alarm_rate: Option<f64>,
}

/// A cell's summary over its repetitions.
#[derive(Clone, Debug)]
pub(crate) struct Summary {
    pub(crate) cell: Cell,
    /// Fraction of runs flagged in the anomaly's first window.
    pub(crate) power_first: f64,
    /// Fraction flagged within `detect_within` windows.
    pub(crate) power_within: f64,
    /// Mean windows to detection among detected runs.
    pub(crate) mean_delay: f64,
    /// Flags over tests of windows without an anomaly.
    pub(crate) false_alarm_rate: f64,
    pub(crate) null_tests: u64,
    /// Root mean square p95 error, ms.
    pub(crate) p95_rmse_ms: f64,
    /// Root mean square p99 error, ms.
    pub(crate) p99_rmse_ms: f64,
}

fn cells(s: &Scenario) -> Vec<Cell> {
    let mut out = Vec::new();
    for (ai, a) in s.anomalies.iter().enumerate() {
        for &events in &s.events_per_window {
            for &epsilon in &s.epsilons {
                for &magnitude in &a.magnitudes {
                    out.push(Cell {
                        anomaly: ai,
                        magnitude,
                        epsilon,
                        events,
                    });
                }
            }
        }
    }
    out
}

fn summarize(s: &Scenario, cell: Cell, runs: &[RunResult]) -> Summary {
    let n = runs.len().max(1) as f64;
    let first = runs.iter().filter(|r| r.delay == Some(0)).count() as f64;
    let within = runs
        .iter()
        .filter(|r| r.delay.is_some_and(|d| d < s.detect_within))
        .count() as f64;
    let delays: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.delay)
        .map(|d| d as f64)
        .collect();
    let tests: u64 = runs.iter().map(|r| r.null_tests as u64).sum();
    let flags: u64 = runs.iter().map(|r| r.null_flags as u64).sum();
    Summary {
        cell,
        power_first: first / n,
        power_within: within / n,
        mean_delay: if delays.is_empty() {
            f64::NAN
        } else {
            delays.iter().sum::<f64>() / delays.len() as f64
        },
        false_alarm_rate: flags as f64 / tests.max(1) as f64,
        null_tests: tests,
        p95_rmse_ms: (runs.iter().map(|r| r.p95_rmse_ms.powi(2)).sum::<f64>() / n).sqrt(),
        p99_rmse_ms: (runs.iter().map(|r| r.p99_rmse_ms.powi(2)).sum::<f64>() / n).sqrt(),
    }
}

/// Runs every repetition of every cell in model mode; results in a fixed order.
pub(crate) fn sweep(
    s: &Scenario,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<(Cell, Vec<RunResult>)>> {
    let all = cells(s);
    let jobs: Vec<(usize, usize)> = (0..all.len())
        .flat_map(|c| (0..s.repetitions).map(move |r| (c, r)))
        .collect();
    let results: Vec<anyhow::Result<RunResult>> = jobs
        .par_iter()
        .map(|&(c, r)| {
            let released = model::simulate(s, &all[c], model::run_seed(s.seed, c, r))?;
            progress.inc(1);
            Ok(model::evaluate(s, &s.detection, &all[c], &released))
        })
        .collect();
    let mut out: Vec<(Cell, Vec<RunResult>)> = all.iter().map(|c| (*c, Vec::new())).collect();
    for ((c, _), r) in jobs.iter().zip(results) {
        out[*c].1.push(r?);
    }
    Ok(out)
}

fn runs_csv(s: &Scenario, runs: &[(Cell, Vec<RunResult>)]) -> String {
    let mut csv = String::from(
        "anomaly,service,magnitude,epsilon,events_per_window,repetition,detection_delay_windows,null_tests,null_flags,p95_rmse_ms\n",
    );
    for (cell, rs) in runs {
        let a = &s.anomalies[cell.anomaly];
        for (rep, r) in rs.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{:.4}",
                a.kind.as_str(),
                a.service,
                cell.magnitude,
                cell.epsilon,
                cell.events,
                rep,
                r.delay.map(|d| d.to_string()).unwrap_or_default(),
                r.null_tests,
                r.null_flags,
                r.p95_rmse_ms
            );
        }
    }
    csv
}

fn summary_csv(s: &Scenario, sums: &[Summary]) -> String {
    let mut csv = String::from(
        "anomaly,service,magnitude,epsilon,events_per_window,power_first_window,power_within,mean_delay_windows,false_alarm_rate,null_tests,p95_rmse_ms\n",
    );
    for x in sums {
        let a = &s.anomalies[x.cell.anomaly];
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{:.4},{:.4},{:.3},{:.5},{},{:.4}",
            a.kind.as_str(),
            a.service,
            x.cell.magnitude,
            x.cell.epsilon,
            x.cell.events,
            x.power_first,
            x.power_within,
            x.mean_delay,
            x.false_alarm_rate,
            x.null_tests,
            x.p95_rmse_ms
        );
    }
    csv
}

/// The smallest magnitude of `anomaly` detected with ≥ 95% power within `detect_within`
/// windows at (`epsilon`, `events`), with its summary.
fn smallest_detected(
    sums: &[Summary],
    anomaly: usize,
    epsilon: f64,
    events: u64,
) -> Option<&Summary> {
    sums.iter()
        .filter(|x| {
            x.cell.anomaly == anomaly
                && x.cell.epsilon == epsilon
                && x.cell.events == events
                && x.cell.magnitude > 0.0
                && x.power_within >= 0.95
        })
        .min_by(|a, b| a.cell.magnitude.total_cmp(&b.cell.magnitude))
}

fn markdown(s: &Scenario, sums: &[Summary], plots: &[String]) -> String {
    let mut md = String::from("# hush sim: privacy against detection\n\n");
    let _ = writeln!(
        md,
        "Model mode, seed {}, {} repetitions of {} windows per combination; anomalies start in \
         the window given below; detection counts toward power within {} window(s) of the start; \
         configured false-alarm rate {} per window and detector; ε is what each aggregator \
         spends per window; sensitivity {} (window histograms of {} events per instance).\n",
        s.seed,
        s.repetitions,
        s.windows,
        s.detect_within,
        s.detection.false_alarm_rate,
        s.sensitivity(),
        s.events_per_client
    );
    for (ai, a) in s.anomalies.iter().enumerate() {
        let svc = s.service(&a.service).expect("validated");
        let _ = writeln!(
            md,
            "## {} on {} (from window {})\n",
            a.kind.as_str(),
            a.service,
            a.start_window
        );
        if a.kind == AnomalyKind::LatencyShift {
            let _ = writeln!(
                md,
                "The service ({}) has its p95 at {:.1} ms without the shift.\n",
                svc.shape(),
                model::true_quantile_ms(svc, 0.0, 0.95)
            );
        }
        let _ = writeln!(
            md,
            "| events/window | ε | smallest {} with ≥ 95% power | power in first window | mean delay (windows) | false-alarm rate | p95 RMSE (ms) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            a.kind.unit()
        );
        for &events in &s.events_per_window {
            for &eps in &s.epsilons {
                let null = sums.iter().find(|x| {
                    x.cell.anomaly == ai
                        && x.cell.epsilon == eps
                        && x.cell.events == events
                        && x.cell.magnitude == 0.0
                });
                let far = null.map(|n| n.false_alarm_rate);
                let rmse = null.map(|n| n.p95_rmse_ms);
                match smallest_detected(sums, ai, eps, events) {
                    Some(x) => {
                        let _ = writeln!(
                            md,
                            "| {events} | {eps} | {} | {:.0}% | {:.2} | {} | {} |",
                            x.cell.magnitude,
                            100.0 * x.power_first,
                            x.mean_delay,
                            far.map(|f| format!("{:.2}%", 100.0 * f))
                                .unwrap_or_else(|| "—".into()),
                            rmse.map(|r| format!("{r:.1}"))
                                .unwrap_or_else(|| "—".into())
                        );
                    }
                    None => {
                        let _ = writeln!(
                            md,
                            "| {events} | {eps} | none of the magnitudes tried | — | — | {} | {} |",
                            far.map(|f| format!("{:.2}%", 100.0 * f))
                                .unwrap_or_else(|| "—".into()),
                            rmse.map(|r| format!("{r:.1}"))
                                .unwrap_or_else(|| "—".into())
                        );
                    }
                }
            }
        }
        md.push('\n');
    }
    if !plots.is_empty() {
        md.push_str("## Plots\n\n");
        for p in plots {
            let _ = writeln!(md, "![{p}]({p})");
        }
    }
    md
}

/// Runs every repetition of every cell through the real system, one cell after another.
async fn pipeline_sweep(
    s: &Scenario,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<(Cell, Vec<RunResult>)>> {
    let mut out = Vec::new();
    for (i, cell) in cells(s).into_iter().enumerate() {
        let runs = pipeline::simulate(s, &cell, s.repetitions, model::run_seed(s.seed, i, 0))
            .await?
            .iter()
            .map(|released| {
                progress.inc(1);
                model::evaluate(s, &s.detection, &cell, released)
            })
            .collect();
        out.push((cell, runs));
    }
    Ok(out)
}

/// Whether the two modes release the same distribution: per bucket of the latency histogram
/// and for the error count, the mean over the pipeline's windows against the model's (a
/// chi-square over the z scores), and the ratio of their variances summed over buckets.
#[derive(Clone, Debug)]
pub(crate) struct Agreement {
    pub(crate) chi2: f64,
    pub(crate) df: usize,
    pub(crate) p_value: f64,
    pub(crate) variance_ratio: f64,
    pub(crate) pipeline_windows: usize,
    pub(crate) model_windows: usize,
}

impl Agreement {
    /// Agree: means not different at p ≥ 0.001, and the pipeline's variance between 0.55 and
    /// 1.8 times the model's (the ratio of a few dozen windows of Laplace-tailed noise is skewed
    /// upwards: by chance outside these bounds in fewer than 1 in 10^5 runs).
    pub(crate) fn agrees(&self) -> bool {
        self.agrees_at(0.001)
    }

    /// [`Agreement::agrees`] with means not different at p ≥ `p_min`.
    pub(crate) fn agrees_at(&self, p_min: f64) -> bool {
        self.p_value >= p_min && self.variance_ratio > 0.55 && self.variance_ratio < 1.8
    }
}

fn columns(windows: &[&model::Released]) -> Vec<Vec<f64>> {
    let k = windows.first().map(|w| w.counts.len()).unwrap_or(0);
    (0..=k)
        .map(|b| {
            windows
                .iter()
                .map(|w| if b < k { w.counts[b] as f64 } else { w.errors })
                .collect()
        })
        .collect()
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(2) as f64;
    let m = x.iter().sum::<f64>() / x.len().max(1) as f64;
    (
        m,
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0),
    )
}

pub(crate) fn agreement(pipeline: &[model::Released], model: &[model::Released]) -> Agreement {
    let p = columns(&pipeline.iter().collect::<Vec<_>>());
    let m = columns(&model.iter().collect::<Vec<_>>());
    let (mut chi2, mut vp, mut vm) = (0.0, 0.0, 0.0);
    for (a, b) in p.iter().zip(&m) {
        let ((ma, va), (mb, vb)) = (mean_var(a), mean_var(b));
        // Under the hypothesis both share one variance, which the model's many windows
        // estimate well; the pipeline's few heavy-tailed windows would make the statistic
        // heavier-tailed than χ² (it failed about 7 times in 1,000 at p < 0.001).
        let se2 = vb * (1.0 / a.len() as f64 + 1.0 / b.len() as f64);
        if se2 > 0.0 {
            chi2 += (ma - mb).powi(2) / se2;
        }
        vp += va;
        vm += vb;
    }
    let df = p.len();
    // Wilson–Hilferty: (χ²/df)^(1/3) is close to normal.
    let k = df as f64;
    let z = ((chi2 / k).cbrt() - (1.0 - 2.0 / (9.0 * k))) / (2.0 / (9.0 * k)).sqrt();
    Agreement {
        chi2,
        df,
        p_value: 1.0 - hush_collector::detect::normal_cdf(z),
        variance_ratio: vp / vm.max(1e-12),
        pipeline_windows: pipeline.len(),
        model_windows: model.len(),
    }
}

/// The first cell without an anomaly, run in both modes (the model with 50 times the windows).
async fn check(s: &Scenario) -> anyhow::Result<(Cell, Agreement)> {
    let cell = cells(s)
        .into_iter()
        .find(|c| c.magnitude == 0.0)
        .context("the check needs an anomaly magnitude of 0 (no anomaly) in the scenario")?;
    let piped: Vec<model::Released> = pipeline::simulate(s, &cell, s.repetitions, s.seed)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut modeled = Vec::new();
    for rep in 0..(50 * s.repetitions) {
        modeled.extend(model::simulate(
            s,
            &cell,
            model::run_seed(s.seed, usize::MAX, rep),
        )?);
    }
    Ok((cell, agreement(&piped, &modeled)))
}

/// Runs `hush sim`.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut s = Scenario::from_file(&args.scenario)?;
    if let Some(r) = args.repetitions {
        anyhow::ensure!(r > 0, "--repetitions must be positive");
        s.repetitions = r;
    }
    if let Some(seed) = args.seed {
        s.seed = seed;
    }
    if args.mode == Mode::Check {
        let started = std::time::Instant::now();
        let (cell, a) = check(&s).await?;
        println!(
            "pipeline against model, ε = {}, {} events per window, no anomaly: {} pipeline and {} \
             model windows; means: χ² = {:.1} on {} df, p = {:.3}; variance ratio {:.2} ({:.1} s)",
            cell.epsilon,
            cell.events,
            a.pipeline_windows,
            a.model_windows,
            a.chi2,
            a.df,
            a.p_value,
            a.variance_ratio,
            started.elapsed().as_secs_f64()
        );
        anyhow::ensure!(a.agrees(), "the modes disagree: {a:?}");
        println!("the modes agree");
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.mode == Mode::Coverage {
        let started = std::time::Instant::now();
        let windows = s.repetitions * s.windows;
        let s2 = s.clone();
        let rows = tokio::task::spawn_blocking(move || {
            coverage::coverage(&s2, &coverage::FLEETS, windows)
        })
        .await??;
        let md = coverage::markdown(&s, &rows);
        write(&args.out, "coverage.md", &md)?;
        println!("{md}");
        println!(
            "{} windows per row in {:.1} s; wrote coverage.md to {}",
            windows,
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
        return Ok(());
    }
    if args.mode == Mode::Tune {
        let t = tune::Target {
            epsilon: args.epsilon,
            shift_ms: args.target_shift_ms,
            power: args.power,
            within: args.within.unwrap_or(s.detect_within),
            false_alarm_rate: args
                .false_alarm_rate
                .unwrap_or(s.detection.false_alarm_rate),
        };
        anyhow::ensure!(
            t.epsilon > 0.0 && t.shift_ms > 0.0 && (0.0..1.0).contains(&t.power) && t.within > 0,
            "tune needs a positive --epsilon and --target-shift-ms, --power in (0, 1) and \
             --within of at least 1"
        );
        let mut check = s.clone();
        check.detection.false_alarm_rate = t.false_alarm_rate;
        check
            .detection
            .validate()
            .map_err(|e| anyhow::anyhow!("--false-alarm-rate: {e}"))?;
        let started = std::time::Instant::now();
        let bar = ProgressBar::new(tune::candidate_count(&s) as u64);
        let (s2, t2, b2) = (s.clone(), t.clone(), bar.clone());
        let cands = tokio::task::spawn_blocking(move || tune::search(&s2, &t2, &b2)).await??;
        bar.finish_and_clear();
        let md = tune::report(&s, &cands, &t);
        write(&args.out, "tune.md", &md)?;
        if let Some(c) = tune::best(&cands, &t) {
            let tuned = tune::tuned_scenario(&s, c, &t);
            write(&args.out, "tuned.toml", &toml::to_string(&tuned)?)?;
        }
        println!("{md}");
        println!(
            "{} configurations in {:.1} s; wrote tune.md and tuned.toml to {}",
            cands.len(),
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
        return Ok(());
    }
    let total = (cells(&s).len() * s.repetitions) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} runs ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let runs = match args.mode {
        Mode::Pipeline => pipeline_sweep(&s, &bar).await?,
        _ => {
            let s2 = s.clone();
            let b2 = bar.clone();
            tokio::task::spawn_blocking(move || sweep(&s2, &b2)).await??
        }
    };
    bar.finish_and_clear();
    let sums: Vec<Summary> = runs.iter().map(|(c, r)| summarize(&s, *c, r)).collect();
    write(&args.out, "runs.csv", &runs_csv(&s, &runs))?;
    write(&args.out, "summary.csv", &summary_csv(&s, &sums))?;
    let plots = if args.no_plots {
        Vec::new()
    } else {
        plot::all(&s, &sums, &args.out)?
    };
    let mut md = markdown(&s, &sums, &plots);
    if args.mode == Mode::Pipeline {
        md = md.replacen(
            "Model mode",
            "Pipeline mode (the real system in process)",
            1,
        );
    }
    write(&args.out, "summary.md", &md)?;
    println!("{md}");
    println!(
        "{} runs in {:.1} s; wrote runs.csv, summary.csv, summary.md{} to {}",
        total,
        started.elapsed().as_secs_f64(),
        if plots.is_empty() { "" } else { " and plots" },
        args.out.display()
    );
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn small() -> Scenario {
        let mut s =
            Scenario::from_toml(include_str!("../../scenarios/default.toml")).expect("default");
        s.repetitions = 3;
        s.epsilons = vec![1.0];
        s.anomalies[0].magnitudes = vec![0.0, 40.0];
        s.anomalies[1].magnitudes = vec![0.0, 0.02];
        s
    }

    #[test]
    fn the_same_seed_gives_the_same_csv_and_another_seed_does_not() {
        let s = small();
        let bar = ProgressBar::hidden();
        let a = runs_csv(&s, &sweep(&s, &bar).unwrap());
        let b = runs_csv(&s, &sweep(&s, &bar).unwrap());
        assert_eq!(a, b);
        let mut other = s.clone();
        other.seed += 1;
        assert_ne!(a, runs_csv(&other, &sweep(&other, &bar).unwrap()));
        assert_eq!(a.lines().count(), 1 + 4 * 3);
    }

    #[test]
    fn without_an_anomaly_the_false_alarm_rate_stays_within_the_configured_rate() {
        // 150 runs × 10 tested windows at α = 1%: flags ~ Binomial(1500, 0.01), mean 15,
        // sd 3.9 (a little more: windows of a run share baseline windows). Accept up to
        // 15 + 4.5 sd ≈ 32.5, i.e. a rate below 2.2%; a detector that ignored the DP noise
        // variance flags far more at ε = 0.5.
        let mut s = small();
        s.repetitions = 150;
        s.epsilons = vec![0.5];
        s.anomalies.truncate(1);
        s.anomalies[0].magnitudes = vec![0.0];
        let runs = sweep(&s, &ProgressBar::hidden()).unwrap();
        let sum = summarize(&s, runs[0].0, &runs[0].1);
        assert_eq!(sum.null_tests, 150 * 10);
        assert!(
            sum.false_alarm_rate < 0.0217,
            "false-alarm rate {:.4} over {} tests",
            sum.false_alarm_rate,
            sum.null_tests
        );
    }

    #[test]
    fn on_other_latency_shapes_the_false_alarm_rate_stays_within_the_configured_rate() {
        // The shipped bimodal and heavy-tailed scenarios, 400 runs × 10 steady windows at
        // ε = 0.5 and 2 each: flags ~ Binomial(4000, ≤ 0.01) (a little wider: a run's windows
        // share baselines); accept below 1.5% (mean + 3.2 sd).
        for (name, text) in [
            ("bimodal", include_str!("../../scenarios/bimodal.toml")),
            (
                "heavy-tail",
                include_str!("../../scenarios/heavy-tail.toml"),
            ),
        ] {
            let mut s = Scenario::from_toml(text).expect(name);
            s.repetitions = 400;
            s.epsilons = vec![0.5, 2.0];
            s.anomalies[0].magnitudes = vec![0.0];
            let runs = sweep(&s, &ProgressBar::hidden()).unwrap();
            for (cell, r) in &runs {
                let sum = summarize(&s, *cell, r);
                assert_eq!(sum.null_tests, 400 * 10);
                assert!(
                    sum.false_alarm_rate < 0.015,
                    "{name} at ε {}: false-alarm rate {:.4} over {} tests",
                    cell.epsilon,
                    sum.false_alarm_rate,
                    sum.null_tests
                );
            }
        }
    }

    #[test]
    fn a_mixture_s_quantiles_invert_its_cdf_and_samples_follow_it() {
        let s = Scenario::from_toml(include_str!("../../scenarios/bimodal.toml")).unwrap();
        let svc = &s.services[0];
        for q in [0.1, 0.5, 0.8, 0.95, 0.99] {
            let x = svc.quantile_ms(q);
            assert!((svc.cdf(x) - q).abs() < 1e-9, "q {q}: cdf {}", svc.cdf(x));
        }
        // 80% hits around 8 ms: the median is a hit, the p95 a miss.
        assert!(svc.quantile_ms(0.5) < 15.0 && svc.quantile_ms(0.95) > 100.0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x95 = svc.quantile_ms(0.95);
        let above = (0..20_000)
            .filter(|_| svc.sample_ms(&mut rng) > x95)
            .count();
        // Binomial(20000, 0.05): mean 1000, sd 31.
        assert!((above as f64 - 1_000.0).abs() < 160.0, "{above}");
        // Weights that do not add up, or a mixture and median_ms together, are refused.
        let text = include_str!("../../scenarios/bimodal.toml");
        assert!(Scenario::from_toml(&text.replace("weight = 0.8", "weight = 0.7")).is_err());
        let both = text.replace(
            "error_rate = 0.01\nmix",
            "error_rate = 0.01\nmedian_ms = 9.0\nmix",
        );
        assert_ne!(both, text);
        assert!(Scenario::from_toml(&both).is_err());
    }

    /// A scenario small enough for the real system in a test: 100 instances, 6 windows.
    pub(crate) fn tiny() -> Scenario {
        let mut s = small();
        s.windows = 6;
        s.repetitions = 3;
        s.events_per_window = vec![2_000];
        s.min_batch_size = 50;
        s.anomalies.truncate(1);
        s.anomalies[0].start_window = 3;
        s.anomalies[0].magnitudes = vec![0.0];
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pipeline_and_the_model_release_the_same_distribution() {
        let s = tiny();
        let (_, a) = check(&s).await.unwrap();
        assert_eq!(a.pipeline_windows, 18);
        // The pipeline's noise is real (unseeded): at p ≥ 10^-6 a false failure is about as
        // rare (`hush sim --check` holds p ≥ 0.001).
        assert!(a.agrees_at(1e-6), "{a:?}");
        // The check can fail: a model with twice the noise is told apart (its variance ratio
        // is near 0.25; at 0.55 or above by chance in about 4 runs of a million).
        let cell = cells(&s)[0];
        let piped = pipeline::simulate(&s, &cell, 1, 9).await.unwrap().concat();
        let mut noisier = s.clone();
        noisier.events_per_client *= 2;
        let modeled: Vec<model::Released> = (0..100)
            .flat_map(|r| model::simulate(&noisier, &cell, r).unwrap())
            .collect();
        assert!(!agreement(&piped, &modeled).agrees());
    }

    #[test]
    fn the_summary_names_the_smallest_detected_shift() {
        let s = small();
        let runs = sweep(&s, &ProgressBar::hidden()).unwrap();
        let sums: Vec<Summary> = runs.iter().map(|(c, r)| summarize(&s, *c, r)).collect();
        let md = markdown(&s, &sums, &[]);
        assert!(md.contains("| 100000 | 1 | 40 |"), "{md}");
        assert!(md.contains("| 100000 | 1 | 0.02 |"), "{md}");
    }
}
