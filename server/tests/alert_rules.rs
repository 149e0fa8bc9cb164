//! The example alert rules in docs/prometheus/hush-alerts.yml are a valid Prometheus rules file:
//! every rule has a name, a PromQL expression that parses, a severity and a summary, and every
//! metric an expression reads is one hush exports (or Prometheus's own `up`). docs/operators.md
//! lists every metric hush exports.

use std::collections::BTreeMap;

use hush_server::metrics::CATALOG;
use promql_parser::parser::Expr;
use promql_parser::util::{ExprVisitor, walk_expr};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The metrics an expression selects, each with the label names its matchers use.
#[derive(Default)]
struct Names(Vec<(String, Vec<String>)>);

impl ExprVisitor for Names {
    type Error = String;

    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(v) => v,
            Expr::MatrixSelector(m) => &m.vs,
            _ => return Ok(true),
        };
        if let Some(n) = &vs.name {
            let labels = vs
                .matchers
                .matchers
                .iter()
                .map(|m| m.name.clone())
                .collect();
            self.0.push((n.clone(), labels));
        }
        Ok(true)
    }
}

/// The labels a series of `name` can carry: the metric's own, `le` on buckets, and what
/// Prometheus adds (`job`, `instance`).
fn labels_of(name: &str) -> Vec<&'static str> {
    let mut out = vec!["job", "instance"];
    if let Some(m) = CATALOG.iter().find(|m| {
        name == m.name
            || name
                .strip_prefix(m.name)
                .is_some_and(|s| s.starts_with('_'))
    }) {
        out.extend(m.labels);
        if name.ends_with("_bucket") {
            out.push("le");
        }
    }
    out
}

/// The series names a metric is exported as (a histogram as its `_bucket`, `_sum`, `_count`).
fn exported() -> Vec<String> {
    let mut out = vec!["up".to_owned()];
    for m in CATALOG {
        out.push(m.name.to_owned());
        if m.kind == hush_server::metrics::Kind::Histogram {
            for s in ["_bucket", "_sum", "_count"] {
                out.push(format!("{}{s}", m.name));
            }
        }
    }
    out
}

fn docs(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../docs/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("docs/{path}: {e}"))
}

#[test]
fn the_example_alert_rules_parse_and_read_only_exported_metrics() {
    let file: RuleFile =
        serde_yaml_ng::from_str(&docs("prometheus/hush-alerts.yml")).expect("a rules file");
    let exported = exported();
    let mut alerts = std::collections::BTreeSet::new();
    let mut used = std::collections::BTreeSet::new();
    for g in &file.groups {
        assert!(!g.rules.is_empty(), "group {} has no rules", g.name);
        for r in &g.rules {
            assert!(alerts.insert(r.alert.clone()), "{} twice", r.alert);
            let expr = promql_parser::parser::parse(&r.expr)
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", r.alert, r.expr));
            let mut names = Names::default();
            walk_expr(&mut names, &expr).unwrap();
            assert!(!names.0.is_empty(), "{} reads no metric", r.alert);
            for (n, labels) in names.0 {
                assert!(exported.contains(&n), "{}: hush exports no {n}", r.alert);
                for l in &labels {
                    assert!(
                        labels_of(&n).contains(&l.as_str()),
                        "{}: {n} has no label {l}",
                        r.alert
                    );
                }
                used.insert(n);
            }
            if let Some(d) = &r.for_ {
                promql_parser::util::parse_duration(d)
                    .unwrap_or_else(|e| panic!("{}: for {d}: {e}", r.alert));
            }
            assert!(
                ["page", "ticket", "info"].contains(&r.labels["severity"].as_str()),
                "{}",
                r.alert
            );
            assert!(!r.annotations["summary"].is_empty(), "{}", r.alert);
        }
    }
    // The rules cover each part of the cluster.
    for m in [
        "hush_reports_rejected_total",
        "hush_shuffler_forward_retries_total",
        "hush_epsilon_left",
        "hush_peer_refusals_total",
        "hush_aggregation_job_retries_total",
    ] {
        assert!(used.contains(m), "no rule reads {m}");
    }
}

#[test]
fn the_operators_guide_lists_every_metric() {
    let text = docs("operators.md");
    for m in CATALOG {
        assert!(
            text.contains(&format!("`{}`", m.name)),
            "docs/operators.md does not list {}",
            m.name
        );
    }
}
