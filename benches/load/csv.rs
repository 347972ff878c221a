//! Latency samples as CSV, and the cumulative distributions drawn from them.
//!
//! A run writes every publish-to-delivery sample (`scenario,server,round,env,subscriber,
//! latency_ms`). A chart can be drawn from such files or from the much smaller CDF files
//! (`scenario,server,fraction,latency_ms,samples`) that `--cdf-csv` writes; `read` takes both.

use crate::stats;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Header of a samples file.
pub const SAMPLES_HEADER: &str = "scenario,server,round,env,subscriber,latency_ms";
/// Header of a CDF file.
pub const CDF_HEADER: &str = "scenario,server,fraction,latency_ms,samples";
/// Largest CSV file read.
const MAX_FILE: u64 = 1 << 30;

/// One publish-to-delivery sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub scenario: String,
    pub server: String,
    pub round: u32,
    pub env: u32,
    pub subscriber: u32,
    pub latency_ns: u64,
}

/// One line of the chart: a scenario measured against a server, as CDF points.
#[derive(Debug, Clone)]
pub struct Series {
    pub server: String,
    pub scenario: String,
    /// How many samples the points were taken from.
    pub samples: u64,
    /// (fraction of samples at or below, latency in ms), fractions increasing.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// Nearest-rank quantile `q` (0..=1) read off the points, in ms.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.points
            .iter()
            .find(|(f, _)| *f >= q - 1e-9)
            .or(self.points.last())
            .map(|p| p.1)
    }
}

/// Keeps a label free of the characters that would break a CSV field or a line.
pub fn field(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ',' => ';',
            '\n' | '\r' | '"' => ' ',
            c => c,
        })
        .collect()
}

/// Writes every sample.
pub fn write_samples(path: &Path, samples: &[Sample]) -> Result<(), String> {
    let mut out = String::with_capacity(samples.len() * 48 + 64);
    out.push_str(SAMPLES_HEADER);
    out.push('\n');
    for s in samples {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.3}",
            field(&s.scenario),
            field(&s.server),
            s.round,
            s.env,
            s.subscriber,
            s.latency_ns as f64 / 1e6
        );
    }
    crate::write_file(path, &out)
}

/// Writes the CDF points of every series.
pub fn write_cdf(path: &Path, series: &[Series]) -> Result<(), String> {
    let mut out = String::from(CDF_HEADER);
    out.push('\n');
    for s in series {
        for (f, ms) in &s.points {
            let _ = writeln!(
                out,
                "{},{},{f:.6},{ms:.3},{}",
                field(&s.scenario),
                field(&s.server),
                s.samples
            );
        }
    }
    crate::write_file(path, &out)
}

/// The fractions a CDF is drawn at: every 0.1 % and every 0.01 % above 99 %.
fn fractions() -> Vec<f64> {
    let mut f: Vec<f64> = (1..=1000).map(|i| f64::from(i) / 1000.0).collect();
    f.extend((9901..10000).map(|i| f64::from(i) / 10_000.0));
    f.sort_by(f64::total_cmp);
    f.dedup_by(|a, b| (*a - *b).abs() < 1e-12);
    f
}

/// CDF points of latencies in ns (sorted in place).
pub fn cdf(latencies: &mut [u64]) -> Vec<(f64, f64)> {
    if latencies.is_empty() {
        return Vec::new();
    }
    latencies.sort_unstable();
    let mut pts: Vec<(f64, f64)> = fractions()
        .into_iter()
        .map(|q| (q, stats::percentile(latencies, q) as f64 / 1e6))
        .collect();
    pts.insert(0, (0.0, latencies[0] as f64 / 1e6));
    pts
}

/// Groups samples by (server, scenario), in order of first appearance.
pub fn series_of(samples: &[Sample]) -> Vec<Series> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for s in samples {
        let key = (s.server.clone(), s.scenario.clone());
        let g = groups.entry(key.clone()).or_default();
        if g.is_empty() {
            order.push(key);
        }
        g.push(s.latency_ns);
    }
    order
        .into_iter()
        .filter_map(|key| {
            let mut v = groups.remove(&key)?;
            Some(Series {
                samples: v.len() as u64,
                points: cdf(&mut v),
                server: key.0,
                scenario: key.1,
            })
        })
        .collect()
}

/// Reads a samples file or a CDF file into series.
pub fn read(path: &Path) -> Result<Vec<Series>, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .len();
    if len > MAX_FILE {
        return Err(format!("{shown}: larger than 1 GiB"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("").trim();
    if header == SAMPLES_HEADER {
        let mut samples = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            let bad = || {
                format!(
                    "{shown}:{}: not scenario,server,round,env,subscriber,latency_ms",
                    i + 2
                )
            };
            let [scenario, server, round, env, sub, ms] = f.as_slice() else {
                return Err(bad());
            };
            let ms: f64 = ms.trim().parse().map_err(|_| bad())?;
            if !ms.is_finite() || ms < 0.0 {
                return Err(bad());
            }
            samples.push(Sample {
                scenario: (*scenario).to_owned(),
                server: (*server).to_owned(),
                round: round.trim().parse().map_err(|_| bad())?,
                env: env.trim().parse().map_err(|_| bad())?,
                subscriber: sub.trim().parse().map_err(|_| bad())?,
                latency_ns: (ms * 1e6).round() as u64,
            });
        }
        Ok(series_of(&samples))
    } else if header == CDF_HEADER {
        let mut out: Vec<Series> = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            let bad = || format!("{shown}:{}: not {CDF_HEADER}", i + 2);
            let [scenario, server, frac, ms, n] = f.as_slice() else {
                return Err(bad());
            };
            let frac: f64 = frac.trim().parse().map_err(|_| bad())?;
            let ms: f64 = ms.trim().parse().map_err(|_| bad())?;
            let n: u64 = n.trim().parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&frac) || !ms.is_finite() || ms < 0.0 {
                return Err(bad());
            }
            match out.last_mut() {
                Some(s) if s.server == *server && s.scenario == *scenario => {
                    s.points.push((frac, ms));
                }
                _ => out.push(Series {
                    server: (*server).to_owned(),
                    scenario: (*scenario).to_owned(),
                    samples: n,
                    points: vec![(frac, ms)],
                }),
            }
        }
        for s in &mut out {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(out)
    } else {
        Err(format!(
            "{shown}: the first line is neither {SAMPLES_HEADER:?} nor {CDF_HEADER:?}"
        ))
    }
}

/// Checks, at every start of the harness, that quantiles read off CDF points are nearest-rank
/// and that a label survives being written as a field.
pub fn self_check() -> Result<(), String> {
    let mut v: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
    let s = Series {
        server: field("srv, x"),
        scenario: "x".into(),
        samples: 1000,
        points: cdf(&mut v),
    };
    let got = (s.quantile(0.5), s.quantile(0.99), s.quantile(1.0));
    if got != (Some(500.0), Some(990.0), Some(1000.0)) || s.server != "srv; x" {
        return Err(format!("self-check: CDF quantiles {got:?} of 1..=1000 ms"));
    }
    Ok(())
}
