//! The admin endpoint over HTTP: health, plugin status and Prometheus text.

/// A free TCP port on localhost (for admin endpoints of daemons under test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs `url`: `(status, body)`, or `None` when nothing answers.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut response = agent.get(&url).call().ok()?;
        let status = response.status().as_u16();
        Some((status, response.body_mut().read_to_string().ok()?))
    })
    .await
    .unwrap()
}

/// The value of the sample `name{labels}` in Prometheus text, e.g.
/// `metric(&text, "keepwarm_messages_received_total", &[("source", "x")])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            return None;
        }
        let found: Vec<(&str, &str)> = rest
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.trim_matches('"')))
            })
            .collect();
        let all = labels.iter().all(|l| found.contains(l)) && found.len() == labels.len();
        all.then(|| value.parse().ok()).flatten()
    })
}

/// Waits until the Prometheus text at `url` satisfies `check`; returns that text.
async fn wait_metrics(url: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let found = std::sync::Mutex::new(String::new());
    super::wait_for(what, super::PATIENCE, || async {
        match http_get(url).await {
            Some((200, body)) if check(&body) => {
                *found.lock().unwrap() = body;
                true
            }
            _ => false,
        }
    })
    .await;
    found.into_inner().unwrap()
}

/// Waits until each gauge of `names` reads 0 for `source` in the Prometheus text at `url`
/// (gauges are sampled now and then); returns that text.
pub async fn wait_gauges_zero(url: &str, source: &str, names: &[&str]) -> String {
    let what = format!("a sample with {names:?} at 0");
    wait_metrics(url, &what, |body| {
        names
            .iter()
            .all(|name| metric(body, name, &[("source", source)]) == Some(0.0))
    })
    .await
}

/// What `GET /plugins` of the admin endpoint at `url` reports; empty while nothing answers.
pub async fn plugins_status(url: &str) -> Vec<serde_json::Value> {
    match http_get(url).await {
        Some((200, body)) => serde_json::from_str(&body).unwrap(),
        _ => Vec::new(),
    }
}
