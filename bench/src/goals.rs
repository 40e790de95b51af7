//! The ratios the issues set goals on, from one bench run: per round (each scenario measured
//! once per round, rounds back to back), and their median over the rounds.
//!
//! A ratio is taken within a round, between runs a few minutes apart, and only then reduced
//! over rounds: on a shared machine whose speed drifts, pairing the runs first keeps the drift
//! out of the ratio, and the median keeps one disturbed round from deciding it.

use crate::Throughput;

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

/// Each ratio's value in every round that measured both its scenarios, rounds in order.
fn by_round(t: &[Throughput]) -> Vec<(&'static str, Vec<f64>)> {
    let rounds = t.iter().map(|x| x.round).max().unwrap_or(0);
    RATIOS
        .iter()
        .map(|ratio| {
            let values = (1..=rounds)
                .filter_map(|round| {
                    let figure = |name: &str| {
                        t.iter()
                            .find(|x| x.round == round && x.name == name)
                            .and_then(|x| ratio.figure.of(x))
                    };
                    Some(figure(ratio.of)? / figure(ratio.to)?)
                })
                .collect();
            (ratio.key, values)
        })
        .filter(|(_, values): &(_, Vec<f64>)| !values.is_empty())
        .collect()
}

/// The median of a list that is not empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[middle - 1], sorted[middle])
    } else {
        sorted[middle]
    }
}

/// `(median of each ratio, each ratio per round)`, for the results file.
pub(crate) fn json(t: &[Throughput]) -> (serde_json::Value, serde_json::Value) {
    let ratios = by_round(t);
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

/// One line per ratio: the median, and each round's value when there were several.
pub(crate) fn print(t: &[Throughput]) {
    for (key, values) in by_round(t) {
        if values.len() == 1 {
            println!("{key}: {:.2}x", values[0]);
        } else {
            let each: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "{key}: {:.2}x (median of {} rounds: {})",
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
            peak_rss_mib: 1.0,
            dead_letters: 0,
            keys: 1,
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
        let (medians, rounds) = json(&t);
        assert_eq!(rounds["keepwarm_plain_cpu_per_message_vs_native"][1], 1.5);
        assert_eq!(medians["keepwarm_plain_cpu_per_message_vs_native"], 1.2);
        assert_eq!(medians["keepwarm_plain_vs_native"], 1.0);
        // Two rounds: the mean of 1.6 and 1.8.
        let versioned = medians["keepwarm_versioned_cache_cpu_vs_plain"]
            .as_f64()
            .unwrap();
        assert!((versioned - 1.7).abs() < 1e-9, "{versioned}");
        assert!(medians.get("keepwarm_kafka_vs_native_kafka").is_none());
    }

    #[test]
    fn the_median_of_an_even_count_is_the_middle_pair_s_mean() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
