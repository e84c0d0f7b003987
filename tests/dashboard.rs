//! `grafana/weir.json`: an importable dashboard that queries only what weir exports.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use std::time::Duration;

use support::{Gateway, Upstream};

const DASHBOARD: &str = include_str!("../grafana/weir.json");

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("grafana/weir.json is JSON")
}

/// Every `expr` of every panel target (and of the template variables' queries).
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| expressions(i, out)),
        _ => {}
    }
}

/// The `weir_*` metric names an expression refers to.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("weir_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn the_dashboard_is_importable_with_a_datasource_variable() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d.get("id").is_none_or(Value::is_null),
        "no instance-specific id"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable named `datasource`"
    );
    // Every datasource reference outside Grafana's built-in annotation is the variable.
    fn check(v: &Value, path: &str) {
        match v {
            Value::Object(map) => {
                if let Some(ds) = map.get("datasource") {
                    let builtin = ds["uid"] == "-- Grafana --";
                    assert!(
                        builtin || (ds["type"] == "prometheus" && ds["uid"] == "${datasource}"),
                        "{path}: hard-coded datasource {ds}"
                    );
                }
                for (k, v) in map {
                    check(v, &format!("{path}.{k}"));
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    check(v, &format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }
    check(&d, "$");
    let panels = d["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Request rate by outcome",
        "Client latency percentiles",
        "Error rate per upstream",
        "Selection probability per upstream",
        "Retries by reason",
        "In flight vs concurrency peak",
        "Queue depth vs capacity",
        "Oldest queued request age",
        "Enqueued and replay outcomes",
        "Dead letters",
        "Config reloads",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id"
        );
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "gridPos of {}",
            p["title"]
        );
        if p["type"] != "row" {
            assert!(!p["targets"].as_array().expect("targets").is_empty());
        }
    }
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(weir_request_duration_seconds_bucket{job=~"$job"}[5m]))) / my_weir_x"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["weir_request_duration_seconds_bucket"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported_and_every_family_is_shown() {
    let a = Upstream::start("a").await;
    // A registry and a health check, so that their families are exported too.
    let gw = Gateway::builder()
        .upstream(&a)
        .yaml(
            "clusters:\n  default: {health_check: {kind: tcp, interval: 200ms, timeout: 100ms}}\n  \
             api: {registry: {liveness: 30s}}\n  \
             names: {dns: {name: nodes.test, port: 80, refresh: 1s, server: \"127.0.0.1:9\"}}",
        )
        .start()
        .await;
    assert_eq!(gw.register("api", "n1", a.port(), "").await.status, 200);
    for family in ["weir_health_checks_total", "weir_dns_lookups_total"] {
        gw.wait_for_metric(family, &[], |v| v >= 1.0, Duration::from_secs(10))
            .await;
    }
    let m = gw.metrics().await;

    let mut exprs = Vec::new();
    expressions(&dashboard(), &mut exprs);
    assert!(exprs.len() > 20, "only {} expressions", exprs.len());
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for name in &used {
        assert!(
            m.samples.iter().any(|s| &s.name == name),
            "the dashboard queries {name}, which weir does not export\n{}",
            m.text
        );
    }
    let exported: BTreeSet<&str> = m
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for family in exported {
        assert!(
            used.iter().any(|u| u == family
                || u.strip_prefix(family)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))),
            "no panel shows {family}"
        );
    }
}
