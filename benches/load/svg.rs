//! The latency chart: one cumulative distribution per scenario and server on one SVG, with a
//! logarithmic latency axis (so that 10 ms and 1 s both show), a linear fraction axis with the
//! median and the 99th percentile marked, and a legend giving each line's p50 and p99. SVG is
//! text: no plotting dependency.

use crate::csv::Series;
use std::fmt::Write as _;

const WIDTH: f64 = 960.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 56.0;
const PLOT_W: f64 = 840.0;
const PLOT_H: f64 = 400.0;
const LEGEND_LINE: f64 = 20.0;
/// Distinct line colours (then dashes repeat them).
const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms_label(v: f64) -> String {
    if v >= 1000.0 {
        let s = format!("{:.0}", v);
        let b = s.as_bytes();
        let mut out = String::new();
        for (i, c) in b.iter().enumerate() {
            if i > 0 && (b.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(*c as char);
        }
        out
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Nice bounds for a logarithmic axis: the largest 1, 2 or 5 × 10^k at or below `lo`, and the
/// smallest at or above `hi`.
fn log_bounds(lo: f64, hi: f64) -> (f64, f64) {
    let steps = |d: i32| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(d));
    let lo = lo.max(0.001);
    let hi = hi.max(lo * 2.0);
    let dl = lo.log10().floor() as i32;
    let low = steps(dl)
        .into_iter()
        .rfind(|v| *v <= lo * 1.000_001)
        .unwrap_or(10f64.powi(dl));
    let dh = hi.log10().floor() as i32;
    let high = steps(dh)
        .into_iter()
        .chain(steps(dh + 1))
        .find(|v| *v >= hi * 0.999_999)
        .unwrap_or(10f64.powi(dh + 1));
    (low, high)
}

/// The chart as SVG text.
pub fn cdf_chart(series: &[Series], title: &str) -> String {
    // The axis spans the 0.1 % point of the fastest line to the slowest line's maximum.
    let lows: Vec<f64> = series
        .iter()
        .filter_map(|s| s.points.iter().find(|p| p.0 >= 0.001).map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let highs: Vec<f64> = series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (lo_ms, hi_ms) = if lows.is_empty() || highs.is_empty() {
        (1.0, 1000.0)
    } else {
        log_bounds(
            lows.iter().copied().fold(f64::INFINITY, f64::min),
            highs.iter().copied().fold(0.0, f64::max),
        )
    };
    let (lo, hi) = (lo_ms.log10(), hi_ms.log10());
    let x = |ms: f64| LEFT + (ms.clamp(lo_ms, hi_ms).log10() - lo) / (hi - lo) * PLOT_W;
    let y = |f: f64| TOP + (1.0 - f.clamp(0.0, 1.0)) * PLOT_H;
    let height = TOP + PLOT_H + 64.0 + 2.0 * LEGEND_LINE * series.len() as f64 + 16.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        LEFT + PLOT_W / 2.0,
        esc(title)
    );
    // Grid and axes.
    let (dl, dh) = (lo.floor() as i32, hi.ceil() as i32);
    for d in dl..=dh {
        for m in [1.0, 2.0, 5.0] {
            let v = 10f64.powi(d) * m;
            if v < lo_ms * 0.999_999 || v > hi_ms * 1.000_001 {
                continue;
            }
            let px = x(v);
            let major = m == 1.0;
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="{}" stroke-width="1"/>"##,
                TOP + PLOT_H,
                if major { "#cccccc" } else { "#eeeeee" }
            );
            let _ = writeln!(
                s,
                r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + PLOT_H + 16.0,
                ms_label(v)
            );
        }
    }
    for i in 0..=10 {
        let f = f64::from(i) / 10.0;
        let py = y(f);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eeeeee" stroke-width="1"/>"##,
            LEFT + PLOT_W
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            format_args!("{:.0} %", f * 100.0)
        );
    }
    for (f, name) in [(0.5, "p50"), (0.99, "p99")] {
        let py = y(f);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#555555" stroke-width="1" stroke-dasharray="4 3"/>"##,
            LEFT + PLOT_W
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#555555" text-anchor="end">{name}</text>"##,
            LEFT + PLOT_W - 4.0,
            py + 13.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#000000"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">publish → delivery latency (ms, logarithmic)</text>"#,
        LEFT + PLOT_W / 2.0,
        TOP + PLOT_H + 36.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">deliveries at or below (cumulative fraction)</text>"#,
        TOP + PLOT_H / 2.0,
        TOP + PLOT_H / 2.0
    );
    // Lines and legend.
    for (i, se) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if i >= COLOURS.len() {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let mut pts = String::new();
        let mut prev_f = 0.0;
        for &(f, ms) in &se.points {
            let px = x(ms);
            let _ = write!(pts, "{px:.1},{:.1} {px:.1},{:.1} ", y(prev_f), y(f));
            prev_f = f;
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
            pts.trim_end()
        );
        let ly = TOP + PLOT_H + 60.0 + 2.0 * LEGEND_LINE * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"{dash}/>"#,
            LEFT + 28.0
        );
        let q = |p: f64| se.quantile(p).map_or("–".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} — {}</text>"#,
            LEFT + 36.0,
            ly + 4.0,
            esc(&se.server),
            esc(&se.scenario)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#444444">p50 {} ms, p99 {} ms, max {} ms ({} deliveries)</text>"##,
            LEFT + 36.0,
            ly + 4.0 + LEGEND_LINE * 0.8,
            q(0.5),
            q(0.99),
            q(1.0),
            ms_label(se.samples as f64)
        );
    }
    s.push_str("</svg>\n");
    s
}
