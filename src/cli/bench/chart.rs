//! The bench chart as a self-contained SVG: submit → start percentiles against offered
//! load, and completion rate against executor processes beside the two-hop JetStream
//! baseline. Plain SVG text: no fonts, no rendering libraries.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

const W: f64 = 440.0;
const H: f64 = 320.0;
const PAD: f64 = 64.0;
const COLORS: [&str; 3] = ["#1b9e77", "#d95f02", "#7570b3"];

/// A "nice" upper bound for an axis showing values up to `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

struct Panel {
    x0: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn x(&self, v: f64) -> f64 {
        self.x0 + PAD + v / self.x_max * (W - 2.0 * PAD)
    }
    fn y(&self, v: f64) -> f64 {
        H - PAD - v / self.y_max * (H - 2.0 * PAD)
    }

    fn axes(&self, svg: &mut String, title: &str, x_label: &str, y_label: &str, x_ticks: &[f64]) {
        let (left, right, bottom, top) = (self.x0 + PAD, self.x0 + W - PAD, H - PAD, PAD);
        let _ = write!(
            svg,
            r##"<text x="{mid}" y="24" font-size="14" text-anchor="middle">{title}</text>
<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>
<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="#333"/>
<text x="{mid}" y="{xl}" font-size="12" text-anchor="middle">{x_label}</text>
<text x="{yx}" y="{yy}" font-size="12" text-anchor="middle" transform="rotate(-90 {yx} {yy})">{y_label}</text>
"##,
            mid = self.x0 + W / 2.0,
            xl = H - 14.0,
            yx = self.x0 + 14.0,
            yy = H / 2.0,
        );
        for t in x_ticks {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{t}</text>"##,
                self.x(*t),
                bottom + 16.0
            );
        }
        for i in 0..=4 {
            let v = self.y_max * f64::from(i) / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/>
<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{v}</text>
"##,
                left - 6.0,
                self.y(v) + 4.0,
                y = self.y(v),
            );
        }
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str, label: &str, legend_row: usize) {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", self.x(*x), self.y(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
            path.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##,
                self.x(*x),
                self.y(*y)
            );
        }
        let ly = PAD + 4.0 + 16.0 * legend_row as f64;
        let lx = self.x0 + PAD + 10.0;
        let _ = write!(
            svg,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>
<text x="{}" y="{}" font-size="11">{label}</text>
"##,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0
        );
    }
}

/// Writes the chart to `path`. `latency`: (offered load %, [p50, p95, p99] ms);
/// `scaling`: (executor processes, completions/s).
pub(super) fn write(
    path: &Path,
    latency: &[(f64, [f64; 3])],
    scaling: &[(f64, f64)],
    two_hop: f64,
) -> anyhow::Result<()> {
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"##,
        2.0 * W
    );
    let left = Panel {
        x0: 0.0,
        x_max: 100.0,
        // Headroom above the highest point for the legend.
        y_max: nice_max(1.3 * latency.iter().map(|(_, p)| p[2]).fold(0.0, f64::max)),
    };
    left.axes(
        &mut svg,
        "submit → start latency at offered load",
        "offered load, % of the measured maximum",
        "ms",
        &[0.0, 20.0, 40.0, 60.0, 80.0, 100.0],
    );
    for (i, name) in ["p50", "p95", "p99"].iter().enumerate() {
        let points: Vec<(f64, f64)> = latency.iter().map(|(load, p)| (*load, p[i])).collect();
        left.line(&mut svg, &points, COLORS[i], name, i);
    }
    let executors_max = scaling.iter().map(|(e, _)| *e).fold(1.0, f64::max);
    let right = Panel {
        x0: W,
        x_max: executors_max,
        y_max: nice_max(1.3 * scaling.iter().map(|(_, r)| *r).fold(two_hop, f64::max)),
    };
    let ticks: Vec<f64> = scaling.iter().map(|(e, _)| *e).collect();
    right.axes(
        &mut svg,
        "jobs completed per second",
        "executor processes",
        "jobs/s",
        &ticks,
    );
    right.line(&mut svg, scaling, COLORS[0], "mlsched via the predictor", 0);
    right.line(
        &mut svg,
        &[(0.0, two_hop), (executors_max, two_hop)],
        COLORS[1],
        "JetStream two hops (no mlsched code)",
        1,
    );
    svg.push_str("</svg>\n");
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(super::nice_max(7.3), 10.0);
        assert_eq!(super::nice_max(2300.0), 2500.0);
        assert_eq!(super::nice_max(0.0), 1.0);
    }

    #[test]
    fn the_chart_is_well_formed_svg_with_every_series() {
        let path = std::env::temp_dir().join(format!("mlsched-chart-{}.svg", std::process::id()));
        super::write(
            &path,
            &[(10.0, [1.0, 2.0, 3.0]), (80.0, [5.0, 9.0, 20.0])],
            &[(1.0, 3000.0), (2.0, 3500.0)],
            5000.0,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 5);
        for label in ["p50", "p95", "p99", "JetStream two hops"] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
