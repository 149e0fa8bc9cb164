//! PNG plots of a sweep (plotters, with an embedded font so no system fonts are needed).

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::Summary;
use super::scenario::Scenario;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Unwrap safety: the embedded file is a valid TrueType font; a test draws every plot.
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSans.ttf"),
        )
        .map_err(|_| ())
        .expect("the embedded font loads");
    });
}

/// One line of a plot.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

fn draw(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_x: bool,
    series: &[Series],
) -> anyhow::Result<()> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let y1 = ys.filter(|y| y.is_finite()).fold(0.0f64, f64::max);
    if !x0.is_finite() {
        return Ok(());
    }
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let (lo, hi) = (tx(x0), tx(x1));
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(lo..hi, 0.0..(y1 * 1.08).max(1e-6))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| {
            let x = if log_x { 10f64.powf(*v) } else { *v };
            if x >= 10.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_owned()
            }
        })
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (tx(x), y))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Draws every plot; returns their file names.
pub(super) fn all(s: &Scenario, sums: &[Summary], out: &Path) -> anyhow::Result<Vec<String>> {
    register_font();
    let mut files = Vec::new();
    for (ai, a) in s.anomalies.iter().enumerate() {
        for &events in &s.events_per_window {
            let of = |eps: f64| {
                let mut v: Vec<&Summary> = sums
                    .iter()
                    .filter(|x| {
                        x.cell.anomaly == ai
                            && x.cell.events == events
                            && x.cell.epsilon == eps
                            && x.cell.magnitude > 0.0
                    })
                    .collect();
                v.sort_by(|a, b| a.cell.magnitude.total_cmp(&b.cell.magnitude));
                v
            };
            let kind = a.kind.as_str();
            // One line per ε of `metric` against the magnitude.
            let by_eps = |metric: fn(&Summary) -> f64| -> Vec<Series> {
                s.epsilons
                    .iter()
                    .map(|&eps| Series {
                        label: format!("ε = {eps}"),
                        points: of(eps)
                            .iter()
                            .map(|x| (x.cell.magnitude, metric(x)))
                            .collect(),
                    })
                    .collect()
            };
            let power = by_eps(|x| x.power_within);
            let name = format!("power_{kind}_{events}.png");
            draw(
                &out.join(&name),
                &format!(
                    "{kind} on {}: detection power within {} window(s), {events} events/window",
                    a.service, s.detect_within
                ),
                &format!("magnitude ({}, log scale)", a.kind.unit()),
                "power",
                true,
                &power,
            )?;
            files.push(name);
            let delay = by_eps(|x| x.mean_delay);
            let name = format!("delay_{kind}_{events}.png");
            draw(
                &out.join(&name),
                &format!("{kind} on {}: mean windows to detection", a.service),
                &format!("magnitude ({}, log scale)", a.kind.unit()),
                "windows after the start",
                true,
                &delay,
            )?;
            files.push(name);
        }
        // False alarms and p95 error against ε, one line per traffic level.
        let null = |events: u64| {
            let mut v: Vec<&Summary> = sums
                .iter()
                .filter(|x| {
                    x.cell.anomaly == ai && x.cell.events == events && x.cell.magnitude == 0.0
                })
                .collect();
            v.sort_by(|a, b| a.cell.epsilon.total_cmp(&b.cell.epsilon));
            v
        };
        let kind = a.kind.as_str();
        // One line per traffic level of `metric` against ε.
        let by_events = |metric: fn(&Summary) -> f64| -> Vec<Series> {
            s.events_per_window
                .iter()
                .map(|&n| Series {
                    label: format!("{n} events/window"),
                    points: null(n)
                        .iter()
                        .map(|x| (x.cell.epsilon, metric(x)))
                        .collect(),
                })
                .collect()
        };
        let far = by_events(|x| x.false_alarm_rate);
        let name = format!("false_alarms_{kind}.png");
        draw(
            &out.join(&name),
            &format!(
                "{kind}: false-alarm rate without an anomaly (configured {})",
                s.detection.false_alarm_rate
            ),
            "ε per window (log scale)",
            "false alarms per tested window",
            true,
            &far,
        )?;
        files.push(name);
        if a.kind == super::scenario::AnomalyKind::LatencyShift {
            let err = by_events(|x| x.p95_rmse_ms);
            let name = "p95_error.png".to_owned();
            draw(
                &out.join(&name),
                "error of the released p95 (root mean square)",
                "ε per window (log scale)",
                "ms",
                true,
                &err,
            )?;
            files.push(name);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plot_is_a_png() {
        let mut s = Scenario::from_toml(include_str!("../../scenarios/default.toml")).unwrap();
        s.repetitions = 2;
        s.epsilons = vec![0.5, 1.0];
        s.anomalies[0].magnitudes = vec![0.0, 20.0, 60.0];
        s.anomalies[1].magnitudes = vec![0.0, 0.02];
        let runs = super::super::sweep(&s, &indicatif::ProgressBar::hidden()).unwrap();
        let sums: Vec<Summary> = runs
            .iter()
            .map(|(c, r)| super::super::summarize(&s, *c, r))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let files = all(&s, &sums, dir.path()).unwrap();
        assert_eq!(files.len(), 7);
        for f in files {
            let bytes = std::fs::read(dir.path().join(&f)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{f} is not a PNG");
            assert!(bytes.len() > 5_000, "{f} looks empty");
        }
    }
}
