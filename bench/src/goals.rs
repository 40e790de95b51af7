//! The figures the issues set goals on, from one bench run: per round (each scenario measured
//! once per round, rounds back to back), and their median over the rounds.
//!
//! A ratio is taken within a round, between runs a few minutes apart, and only then reduced
//! over rounds: on a shared machine whose speed drifts, pairing the runs first keeps the drift
//! out of the ratio, and the median keeps one disturbed round from deciding it. Besides the
//! throughput ratios: keepwarm-plain's peak RSS, and its paced p99 over the native worker's.

use crate::{Latency, Throughput};

/// Which figure of a throughput result a ratio reads.
#[derive(Clone, Copy)]
enum Figure {
    MessagesPerSecond,
    CpuPerMillion,
    CacheCpuPerMillion,
}

impl Figure {
    fn of(self, t: &Throughput) -> Option<f64> {
        match self {
            Figure::MessagesPerSecond => Some(t.messages_per_second),
            Figure::CpuPerMillion => Some(t.cpu_seconds_per_million),
            Figure::CacheCpuPerMillion => t.redis_cpu_seconds_per_million,
        }
    }
}

/// A ratio: `key` is `figure` of `of` divided by the same figure of `to`.
struct Ratio {
    key: &'static str,
    figure: Figure,
    of: &'static str,
    to: &'static str,
}

const RATIOS: [Ratio; 7] = [
    Ratio {
        key: "keepwarm_plain_vs_native",
        figure: Figure::MessagesPerSecond,
        of: "keepwarm-plain",
        to: "native-rust",
    },
    Ratio {
        key: "keepwarm_plain_cpu_per_message_vs_native",
        figure: Figure::CpuPerMillion,
        of: "keepwarm-plain",
        to: "native-rust",
    },
    Ratio {
        key: "keepwarm_plain_vs_python",
        figure: Figure::MessagesPerSecond,
        of: "keepwarm-plain",
        to: "python-redis-py",
    },
    Ratio {
        key: "keepwarm_versioned_vs_native",
        figure: Figure::MessagesPerSecond,
        of: "keepwarm-versioned",
        to: "native-rust",
    },
    Ratio {
        key: "keepwarm_versioned_cache_cpu_vs_plain",
        figure: Figure::CacheCpuPerMillion,
        of: "keepwarm-versioned",
        to: "keepwarm-plain",
    },
    Ratio {
        key: "keepwarm_kafka_vs_native_kafka",
        figure: Figure::MessagesPerSecond,
        of: "keepwarm-kafka",
        to: "native-kafka",
    },
    Ratio {
        key: "keepwarm_kafka_vs_native_kafka_cpu_per_message",
        figure: Figure::CpuPerMillion,
        of: "keepwarm-kafka",
        to: "native-kafka",
    },
];

/// Each figure's value in every round that measured it, rounds in order: the ratios, then
/// keepwarm-plain's peak RSS in MiB, then its paced p99 over the native worker's.
fn by_round(t: &[Throughput], l: &[Latency]) -> Vec<(&'static str, Vec<f64>)> {
    let rounds = t
        .iter()
        .map(|x| x.round)
        .chain(l.iter().map(|x| x.round))
        .max()
        .unwrap_or(0);
    let throughput = |round: u32, name: &str| t.iter().find(|x| x.round == round && x.name == name);
    let p99 = |round: u32, name: &str| {
        l.iter()
            .find(|x| x.round == round && x.name == name)
            .map(|x| x.p99_ms)
    };
    let mut figures: Vec<(&'static str, Vec<f64>)> = RATIOS
        .iter()
        .map(|ratio| {
            let values = (1..=rounds)
                .filter_map(|round| {
                    let figure =
                        |name: &str| throughput(round, name).and_then(|x| ratio.figure.of(x));
                    Some(figure(ratio.of)? / figure(ratio.to)?)
                })
                .collect();
            (ratio.key, values)
        })
        .collect();
    figures.push((
        "keepwarm_plain_peak_rss_mib",
        (1..=rounds)
            .filter_map(|round| Some(throughput(round, "keepwarm-plain")?.peak_rss_mib))
            .collect(),
    ));
    figures.push((
        "keepwarm_plain_paced_p99_vs_native",
        (1..=rounds)
            .filter_map(|round| Some(p99(round, "keepwarm-plain")? / p99(round, "native-rust")?))
            .collect(),
    ));
    figures.retain(|(_, values)| !values.is_empty());
    figures
}

/// The median of a list that is not empty.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[middle - 1], sorted[middle])
    } else {
        sorted[middle]
    }
}

/// `(median of each figure, each figure per round)`, for the results file.
pub(crate) fn json(t: &[Throughput], l: &[Latency]) -> (serde_json::Value, serde_json::Value) {
    let ratios = by_round(t, l);
    let medians = ratios
        .iter()
        .map(|(key, values)| ((*key).to_owned(), median(values).into()))
        .collect();
    let rounds = ratios
        .into_iter()
        .map(|(key, values)| (key.to_owned(), values.into()))
        .collect();
    (
        serde_json::Value::Object(medians),
        serde_json::Value::Object(rounds),
    )
}

/// One line per figure: the median, and each round's value when there were several.
pub(crate) fn print(t: &[Throughput], l: &[Latency]) {
    for (key, values) in by_round(t, l) {
        let unit = if key.ends_with("_mib") { " MiB" } else { "x" };
        if values.len() == 1 {
            println!("{key}: {:.2}{unit}", values[0]);
        } else {
            let each: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "{key}: {:.2}{unit} (median of {} rounds: {})",
                median(&values),
                values.len(),
                each.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(round: u32, name: &str, msgs: f64, cpu: f64, cache: f64) -> Throughput {
        Throughput {
            name: name.to_owned(),
            round,
            messages: 1,
            seconds: 1.0,
            messages_per_second: msgs,
            cpu_seconds_per_million: cpu,
            system_cpu_percent: 0.0,
            redis_cpu_seconds_per_million: Some(cache),
            peak_rss_mib: f64::from(round),
            dead_letters: 0,
            keys: 1,
        }
    }

    fn paced(round: u32, name: &str, p99_ms: f64) -> Latency {
        Latency {
            name: name.to_owned(),
            round,
            rate_per_second: 1.0,
            sent: 1,
            observed: 1,
            p50_ms: 1.0,
            p99_ms,
            p999_ms: 1.0,
            max_ms: 1.0,
        }
    }

    #[test]
    fn ratios_pair_scenarios_within_a_round_then_take_the_median() {
        let t = [
            result(1, "keepwarm-plain", 100.0, 12.0, 5.0),
            result(1, "native-rust", 100.0, 10.0, 5.0),
            result(2, "keepwarm-plain", 50.0, 30.0, 5.0),
            result(2, "native-rust", 40.0, 20.0, 5.0),
            result(3, "keepwarm-plain", 90.0, 11.0, 5.0),
            result(3, "native-rust", 100.0, 10.0, 5.0),
            // No versioned run in round 3: that ratio has two rounds.
            result(1, "keepwarm-versioned", 80.0, 15.0, 8.0),
            result(2, "keepwarm-versioned", 30.0, 40.0, 9.0),
        ];
        let latency = [
            paced(1, "keepwarm-plain", 3.0),
            paced(1, "native-rust", 4.0),
            paced(2, "keepwarm-plain", 9.0),
            paced(2, "native-rust", 3.0),
        ];
        let (medians, rounds) = json(&t, &latency);
        assert_eq!(rounds["keepwarm_plain_cpu_per_message_vs_native"][1], 1.5);
        assert_eq!(medians["keepwarm_plain_cpu_per_message_vs_native"], 1.2);
        assert_eq!(medians["keepwarm_plain_vs_native"], 1.0);
        // Two rounds: the mean of 1.6 and 1.8.
        let versioned = medians["keepwarm_versioned_cache_cpu_vs_plain"]
            .as_f64()
            .unwrap();
        assert!((versioned - 1.7).abs() < 1e-9, "{versioned}");
        assert!(medians.get("keepwarm_kafka_vs_native_kafka").is_none());
        assert_eq!(rounds["keepwarm_plain_paced_p99_vs_native"][0], 0.75);
        assert_eq!(medians["keepwarm_plain_paced_p99_vs_native"], 1.875);
        assert_eq!(medians["keepwarm_plain_peak_rss_mib"], 2.0);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_middle_pair_s_mean() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
