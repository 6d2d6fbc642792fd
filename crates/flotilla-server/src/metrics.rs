//! Prometheus metrics: request counts and latency by verb, route and code; and, read from the
//! store at each scrape, the inventory of networks, NICs and the nodes' DHCP-server restarts,
//! migrations by phase, and failed nodes' VMs (restarted elsewhere or reported lost).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub condition: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    networks: Gauge,
    nics: Gauge,
    dhcp_restarts: Family<NodeLabels, Gauge>,
    migrations: Family<PhaseLabels, Gauge>,
    recovered: Family<ConditionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "flotilla_http_requests",
            "API requests by method, route and status code",
            requests.clone(),
        );
        registry.register(
            "flotilla_http_request_duration_seconds",
            "Time to the first response byte, by method and route",
            latency.clone(),
        );
        let (networks, nics) = (Gauge::default(), Gauge::default());
        let dhcp_restarts = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "flotilla_networks",
            "Networks in every project",
            networks.clone(),
        );
        registry.register(
            "flotilla_network_interfaces",
            "VM NICs on networks (ports IPAM holds)",
            nics.clone(),
        );
        registry.register(
            "flotilla_dhcp_server_restarts",
            "Times a node's DHCP servers exited and were started again since its agent started",
            dhcp_restarts.clone(),
        );
        let migrations = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "flotilla_migrations",
            "Migration objects by phase",
            migrations.clone(),
        );
        let recovered = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "flotilla_failed_node_vms",
            "VMs of failed nodes: restarted elsewhere (Evacuated) or reported (NodeLost)",
            recovered.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            networks,
            nics,
            dhcp_restarts,
            migrations,
            recovered,
        }
    }
}

impl Metrics {
    /// Reads the inventory gauges from the store (a few key-range reads per scrape).
    pub async fn refresh(&self, objects: &crate::objects::Objects) {
        let store = objects.store();
        let count = |prefix: String| async move {
            store
                .range(flotilla_store::RangeRequest::prefix(&prefix))
                .await
                .map(|r| r.kvs.len() as i64)
        };
        let networks = flotilla_types::registry::by_kind("Network").expect("registered");
        if let Ok(n) = count(crate::objects::list_prefix(networks, None)).await {
            self.networks.set(n);
        }
        if let Ok(n) = count(crate::ipam::PORTS_PREFIX.to_string()).await {
            self.nics.set(n);
        }
        let kind = flotilla_types::registry::by_kind("Migration").expect("registered");
        if let Ok(range) = store
            .range(flotilla_store::RangeRequest::prefix(
                &crate::objects::list_prefix(kind, None),
            ))
            .await
        {
            self.migrations.clear();
            for phase in [
                "Pending",
                "Preparing",
                "Migrating",
                "Succeeded",
                "Failed",
                "Aborted",
            ] {
                self.migrations
                    .get_or_create(&PhaseLabels {
                        phase: phase.into(),
                    })
                    .set(0);
            }
            for kv in range.kvs {
                let m: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
                let phase = m["status"]["phase"]
                    .as_str()
                    .filter(|p| !p.is_empty())
                    .unwrap_or("Pending");
                self.migrations
                    .get_or_create(&PhaseLabels {
                        phase: phase.into(),
                    })
                    .inc();
            }
        }
        let kind = flotilla_types::registry::by_kind("VirtualMachine").expect("registered");
        if let Ok(range) = store
            .range(flotilla_store::RangeRequest::prefix(
                &crate::objects::list_prefix(kind, None),
            ))
            .await
        {
            let (mut evacuated, mut lost) = (0, 0);
            for kv in range.kvs {
                // Most VMs have neither: skip the parse.
                let text = String::from_utf8_lossy(&kv.value);
                if !text.contains("\"NodeLost\"") && !text.contains("\"Evacuated\"") {
                    continue;
                }
                let vm: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
                for c in vm["status"]["conditions"].as_array().into_iter().flatten() {
                    match (c["type"].as_str(), c["status"].as_str()) {
                        (Some("Evacuated"), Some("True")) => evacuated += 1,
                        (Some("NodeLost"), Some("True")) => lost += 1,
                        _ => {}
                    }
                }
            }
            for (condition, n) in [("Evacuated", evacuated), ("NodeLost", lost)] {
                self.recovered
                    .get_or_create(&ConditionLabels {
                        condition: condition.into(),
                    })
                    .set(n);
            }
        }
        let nodes = flotilla_types::registry::by_kind("Node").expect("registered");
        let prefix = crate::objects::list_prefix(nodes, None);
        if let Ok(range) = store
            .range(flotilla_store::RangeRequest::prefix(&prefix))
            .await
        {
            self.dhcp_restarts.clear();
            for kv in range.kvs {
                let Ok(node) = serde_json::from_slice::<serde_json::Value>(&kv.value) else {
                    continue;
                };
                if let (Some(name), Some(restarts)) = (
                    node["metadata"]["name"].as_str(),
                    node["status"]["dhcpServerRestarts"].as_i64(),
                ) {
                    self.dhcp_restarts
                        .get_or_create(&NodeLabels {
                            node: name.to_string(),
                        })
                        .set(restarts);
                }
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub async fn record(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let method = if watch {
        "WATCH".to_string()
    } else {
        req.method().to_string()
    };
    let started = Instant::now();
    let response = next.run(req).await;
    let labels = RequestLabels {
        method: method.clone(),
        route: route.clone(),
        code: response.status().as_str().to_string(),
    };
    metrics.requests.get_or_create(&labels).inc();
    metrics
        .latency
        .get_or_create(&LatencyLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}
