//! Charts drawn on the console's side as SVG: bars per group, or a line
//! over days, with the 95% interval of the noise under differential
//! privacy. Only released values are drawn; a hover title says each one.

use std::fmt::Write;

/// One point: its label, its released value, and the half-width of its 95%
/// interval when the value is noised.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Point {
    pub(super) label: String,
    pub(super) value: f64,
    pub(super) half_width: Option<f64>,
}

/// How the points are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Bars,
    Line,
}

const WIDTH: f64 = 640.0;
const BAR_HEIGHT: f64 = 22.0;
const LABEL_WIDTH: f64 = 200.0;
const LINE_HEIGHT: f64 = 240.0;

/// Escapes text for SVG content and attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// A point's hover title: its label, value and interval.
fn tip(p: &Point, measure: &str) -> String {
    match p.half_width {
        Some(h) => format!(
            "{}: {measure} {} (95% within {}..{})",
            p.label,
            number(p.value),
            number(p.value - h),
            number(p.value + h)
        ),
        None => format!("{}: {measure} {}", p.label, number(p.value)),
    }
}

/// The scale's end: the largest value or interval end, at least 1.
fn top(points: &[Point]) -> f64 {
    points
        .iter()
        .map(|p| p.value + p.half_width.unwrap_or(0.0))
        .fold(1.0_f64, f64::max)
}

/// An SVG chart of `points` whose values are `measure`; `title` names it
/// for screen readers.
pub(super) fn svg(points: &[Point], shape: Shape, measure: &str, title: &str) -> String {
    match shape {
        Shape::Bars => bars(points, measure, title),
        Shape::Line => line(points, measure, title),
    }
}

fn bars(points: &[Point], measure: &str, title: &str) -> String {
    let scale = (WIDTH - LABEL_WIDTH - 60.0) / top(points);
    let height = BAR_HEIGHT * points.len() as f64 + 30.0;
    let mut out = format!(
        r#"<svg class="chart" role="img" viewBox="0 0 {WIDTH} {height}" preserveAspectRatio="xMinYMin meet" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    for (i, p) in points.iter().enumerate() {
        let y = i as f64 * BAR_HEIGHT;
        let w = (p.value.max(0.0) * scale).max(0.0);
        let tip = tip(p, measure);
        let _ = write!(
            out,
            r#"<g class="bar"><title>{}</title><text x="{:.1}" y="{:.1}" text-anchor="end" class="label">{}</text><rect x="{LABEL_WIDTH}" y="{:.1}" width="{w:.1}" height="{:.1}"/>"#,
            esc(&tip),
            LABEL_WIDTH - 6.0,
            y + BAR_HEIGHT * 0.7,
            esc(&p.label),
            y + 3.0,
            BAR_HEIGHT - 6.0
        );
        if let Some(h) = p.half_width {
            let (lo, hi) = (
                LABEL_WIDTH + ((p.value - h).max(0.0) * scale),
                LABEL_WIDTH + (p.value + h) * scale,
            );
            let mid = y + BAR_HEIGHT / 2.0;
            let _ = write!(
                out,
                r#"<path class="interval" d="M{lo:.1} {mid:.1}H{hi:.1}M{lo:.1} {:.1}V{:.1}M{hi:.1} {:.1}V{:.1}"/>"#,
                mid - 5.0,
                mid + 5.0,
                mid - 5.0,
                mid + 5.0
            );
        }
        let end = w.max((p.value + p.half_width.unwrap_or(0.0)) * scale);
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="value">{}</text></g>"#,
            LABEL_WIDTH + end + 6.0,
            y + BAR_HEIGHT * 0.7,
            esc(&number(p.value))
        );
    }
    out.push_str("</svg>");
    out
}

fn line(points: &[Point], measure: &str, title: &str) -> String {
    let left = 50.0;
    let plot = WIDTH - left - 20.0;
    let scale = (LINE_HEIGHT - 40.0) / top(points);
    let step = if points.len() > 1 {
        plot / (points.len() - 1) as f64
    } else {
        0.0
    };
    let x = |i: usize| left + step * i as f64;
    let y = |v: f64| LINE_HEIGHT - 20.0 - v.max(0.0) * scale;
    let mut out = format!(
        r#"<svg class="chart" role="img" viewBox="0 0 {WIDTH} {LINE_HEIGHT}" preserveAspectRatio="xMinYMin meet" aria-label="{}"><title>{}</title>"#,
        esc(title),
        esc(title)
    );
    let band: Vec<&Point> = points.iter().filter(|p| p.half_width.is_some()).collect();
    if band.len() == points.len() && !points.is_empty() {
        let mut d = String::new();
        for (i, p) in points.iter().enumerate() {
            let h = p.half_width.unwrap_or(0.0);
            let _ = write!(
                d,
                "{}{:.1} {:.1}",
                if i == 0 { "M" } else { "L" },
                x(i),
                y(p.value + h)
            );
        }
        for (i, p) in points.iter().enumerate().rev() {
            let h = p.half_width.unwrap_or(0.0);
            let _ = write!(d, "L{:.1} {:.1}", x(i), y(p.value - h));
        }
        let _ = write!(out, r#"<path class="interval band" d="{d}Z"/>"#);
    }
    let mut d = String::new();
    for (i, p) in points.iter().enumerate() {
        let _ = write!(
            d,
            "{}{:.1} {:.1}",
            if i == 0 { "M" } else { "L" },
            x(i),
            y(p.value)
        );
    }
    let _ = write!(out, r#"<path class="line" d="{d}"/>"#);
    for (i, p) in points.iter().enumerate() {
        let tip = tip(p, measure);
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4"><title>{}</title></circle>"#,
            x(i),
            y(p.value),
            esc(&tip)
        );
    }
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            out,
            r#"<text x="{left}" y="{:.1}" class="label">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="label">{}</text>"#,
            LINE_HEIGHT - 4.0,
            esc(&first.label),
            left + plot,
            LINE_HEIGHT - 4.0,
            esc(&last.label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_draw_each_released_value_and_its_interval_and_escape_labels() {
        let points = vec![
            Point {
                label: "north <b>".into(),
                value: 120.0,
                half_width: Some(12.5),
            },
            Point {
                label: "south".into(),
                value: 80.0,
                half_width: Some(12.5),
            },
        ];
        let svg = svg(&points, Shape::Bars, "customers", "customers by region");
        assert_eq!(svg.matches("<rect").count(), 2);
        assert_eq!(svg.matches(r#"class="interval""#).count(), 2);
        assert!(svg.contains("north &lt;b&gt;"), "{svg}");
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("95% within 107.50..132.50"), "{svg}");
        // The values written are those given, no other.
        let written: Vec<&str> = svg
            .split(r#"class="value">"#)
            .skip(1)
            .map(|rest| rest.split('<').next().unwrap())
            .collect();
        assert_eq!(written, ["120", "80"]);
    }

    #[test]
    fn a_line_has_a_band_only_when_every_point_is_noised() {
        let mut points: Vec<Point> = (0..3)
            .map(|i| Point {
                label: format!("2026-11-0{}", i + 1),
                value: 10.0 * f64::from(i),
                half_width: Some(3.0),
            })
            .collect();
        let with = svg(&points, Shape::Line, "n", "n by day");
        assert!(with.contains("band"));
        assert_eq!(with.matches("<circle").count(), 3);
        points[1].half_width = None;
        let without = svg(&points, Shape::Line, "n", "n by day");
        assert!(!without.contains("band"));
    }
}
