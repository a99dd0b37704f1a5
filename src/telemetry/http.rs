//! The HTTP endpoint for Prometheus and the kubelet's probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use super::Health;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Health,
}

/// Serves on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Health,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health/progress", get(progress))
        .with_state(AppState { metrics, health });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "http endpoint listening");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let ready = state.health.ready();
    let body = serde_json::json!({
        "ready": ready,
        "connected": state.health.connected(),
        "role": if state.health.active() { "active" } else { "standby" },
        "instance": state.health.instance(),
        "epoch": state.health.epoch(),
    });
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// 503 when rows are pending but nothing has been published for
/// `telemetry.progress_timeout_secs`: delivery has stopped although the
/// process looks healthy. Always 200 on a standby.
async fn progress(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let progressing = !state.health.active() || state.health.progressing();
    let body = serde_json::json!({ "progressing": progressing });
    (if progressing { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
