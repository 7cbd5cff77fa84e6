//! What a run and an ablation leave behind for people: `results.md`, a CSV table, SVG plots.

use anyhow::Result;
use glip_train::experiment::{EvalPoint, ExperimentResult};
use glip_train::trainer::LogLine;
use glip_train::write_atomic;
use plotters::prelude::*;
use std::path::Path;

/// Reads `log.jsonl` as (step, loss) pairs; unreadable lines are skipped.
pub fn loss_curve(dir: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join("log.jsonl")) else { return Vec::new() };
    text.lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
        .filter_map(|l| l.losses.get("loss").map(|&v| (l.step as f64, v as f64)))
        .collect()
}

fn fmt(v: f64) -> String {
    if v < 0.0 {
        "n/a".into()
    } else {
        format!("{v:.3}")
    }
}

/// `results.md` of one run: the final numbers, every evaluation, the plot.
pub fn write_run_markdown(dir: &Path, r: &ExperimentResult) -> Result<()> {
    let mut s = format!("# {}\n\n", if r.name.is_empty() { "run" } else { &r.name });
    if let Some(p) = r.last() {
        s += &format!(
            "Final (step {}): validation AP {} / AP50 {} / AP75 {}; held-out AP50 {} (the synthetic task's held-out colour-shape pairs, or data.coco.held_out).\n\n",
            p.step,
            fmt(p.val.get("AP")),
            fmt(p.val.get("AP50")),
            fmt(p.val.get("AP75")),
            fmt(p.heldout_ap50)
        );
    }
    if let Some(b) = r.best() {
        s += &format!(
            "Best validation AP50 {} at step {} ({:.1} min of training).\n\n",
            fmt(b.val.get("AP50")),
            b.step,
            b.train_minutes
        );
    }
    s += &format!(
        "{} steps, {:.1} min of training, {:.1} min wall clock (evaluation included).\n\n",
        r.steps,
        r.train_minutes,
        r.wall_s / 60.0
    );
    // Phrase grounding on captions, where the run has them (`data.val_grounding`).
    let captions = r.evals.iter().any(|p| p.caption.is_some());
    if let Some(c) = r.last().and_then(|p| p.caption.as_ref()) {
        s += &format!(
            "Phrase grounding on {} captions ({} phrases): R@1 {} / R@5 {} / R@10 {}.\n\n",
            c.captions,
            c.phrases,
            fmt(c.recall[0]),
            fmt(c.recall[1]),
            fmt(c.recall[2])
        );
    }
    s += "| step | training min | val AP | val AP50 | held-out AP50 |";
    s += if captions {
        " caption R@1 |\n|---:|---:|---:|---:|---:|---:|\n"
    } else {
        "\n|---:|---:|---:|---:|---:|\n"
    };
    for p in &r.evals {
        s += &format!(
            "| {} | {:.1} | {} | {} | {} |",
            p.step,
            p.train_minutes,
            fmt(p.val.get("AP")),
            fmt(p.val.get("AP50")),
            fmt(p.heldout_ap50)
        );
        if captions {
            s += &format!(" {} |", fmt(p.caption.as_ref().map_or(-1.0, |c| c.recall[0])));
        }
        s += "\n";
    }
    if let Some(p) = r.last().filter(|p| !p.val.per_category_ap.is_empty()) {
        s += &format!("\nPer category at step {}:\n\n", p.step);
        s += &per_category_table(&p.val, &r.held_out);
    }
    s += "\n![loss and AP against steps](curves.svg)\n\nFiles: `config.resolved.toml` (the full config), `log.jsonl` (losses), `eval.jsonl`, `results.json`, `checkpoint.safetensors`.\n";
    Ok(write_atomic(&dir.join("results.md"), s.as_bytes())?)
}

/// A Markdown table of a COCO evaluation's categories: id, name (marked when it is one of
/// `held_out`, the categories held out of training), AP, AP50.
pub fn per_category_table(m: &glip_train::eval::CocoMetrics, held_out: &[String]) -> String {
    let mut s = String::from("| id | category | AP | AP50 |\n|---:|---|---:|---:|\n");
    for (id, name, ap, ap50) in m.per_category() {
        let mark = if held_out.iter().any(|h| h == name) { " (held out)" } else { "" };
        s += &format!("| {id} | {name}{mark} | {} | {} |\n", fmt(ap), fmt(ap50));
    }
    s
}

type Series = (String, Vec<(f64, f64)>);

/// One panel: lines over a shared x axis.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let pts = series.iter().flat_map(|s| s.1.iter());
    let x_max = pts.clone().map(|p| p.0).fold(0f64, f64::max).max(1e-9);
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let lo = pts.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = pts.map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi > lo {
            (lo.min(0.0), hi * 1.05)
        } else {
            (0.0, 1.0)
        }
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..x_max, y_min..y_max)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    Ok(())
}

/// `curves.svg` of one run: training loss, and validation AP / AP50 / held-out AP50, against
/// steps.
pub fn plot_run(dir: &Path, r: &ExperimentResult) -> Result<()> {
    let path = dir.join("curves.svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let (left, right) = root.split_horizontally(500);
        panel(&left, "training loss", "step", "loss", &[("loss".into(), loss_curve(dir))], None)?;
        let ap: Vec<Series> = vec![
            (
                "val AP50".into(),
                r.evals.iter().map(|p| (p.step as f64, p.val.get("AP50"))).collect(),
            ),
            ("val AP".into(), r.evals.iter().map(|p| (p.step as f64, p.val.get("AP"))).collect()),
            (
                "held-out AP50".into(),
                r.evals
                    .iter()
                    .filter(|p| p.heldout_ap50 >= 0.0)
                    .map(|p| (p.step as f64, p.heldout_ap50))
                    .collect(),
            ),
        ];
        panel(&right, "validation", "step", "AP", &ap, Some((0.0, 1.0)))?;
        root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    Ok(write_atomic(&path, svg.as_bytes())?)
}

/// One run of an ablation: its cell's name, the overrides that make the cell, the seed it ran
/// with (`[ablation] seeds`), its result.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Short name (folder name).
    pub name: String,
    /// `key=value` overrides over the base config.
    pub sets: Vec<String>,
    /// `run.seed` of this run, when the ablation repeats every cell over seeds.
    pub seed: Option<u64>,
    /// What it measured.
    pub result: ExperimentResult,
}

/// The table's columns after the cell, the overrides (and the seed).
const NUMBERS: [&str; 9] = [
    "steps",
    "train_min",
    "val_AP",
    "val_AP50",
    "best_val_AP50",
    "best_step",
    "heldout_AP50",
    "best_heldout_AP50",
    "caption_R@1",
];

/// A run's numbers, in [`NUMBERS`] order; -1 where it has none.
fn numbers(r: &ExperimentResult) -> [f64; 9] {
    let (ap, ap50, held) = r
        .last()
        .map_or((-1.0, -1.0, -1.0), |p| (p.val.get("AP"), p.val.get("AP50"), p.heldout_ap50));
    let (best, best_step) = r.best().map_or((-1.0, 0), |p| (p.val.get("AP50"), p.step));
    let best_held = r.evals.iter().map(|p| p.heldout_ap50).fold(-1.0, f64::max);
    let caption = r.last().and_then(|p| p.caption.as_ref()).map_or(-1.0, |c| c.recall[0]);
    [r.steps as f64, r.train_minutes, ap, ap50, best, best_step as f64, held, best_held, caption]
}

/// Column `k` of [`NUMBERS`] of one run as the table writes it.
fn number(k: usize, v: f64) -> String {
    match NUMBERS[k] {
        "steps" | "best_step" => format!("{v:.0}"),
        "train_min" => format!("{v:.1}"),
        _ => fmt(v),
    }
}

/// Column `k` over the runs of one cell: the mean, and with two runs or more `± s` (the sample
/// standard deviation); "n/a" when a run has none.
fn mean_sd(k: usize, vs: &[f64]) -> String {
    if vs.is_empty() || vs.iter().any(|&v| v < 0.0) {
        return "n/a".into();
    }
    let n = vs.len() as f64;
    let mean = vs.iter().sum::<f64>() / n;
    if vs.len() < 2 {
        return number(k, mean);
    }
    let sd = (vs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let digits = if matches!(NUMBERS[k], "steps" | "best_step" | "train_min") { 1 } else { 3 };
    format!("{mean:.digits$} ± {sd:.digits$}")
}

/// The runs grouped by cell, in the order the cells first ran.
fn by_cell(cells: &[Cell]) -> Vec<(&str, Vec<&Cell>)> {
    let mut groups: Vec<(&str, Vec<&Cell>)> = Vec::new();
    for c in cells {
        match groups.iter_mut().find(|g| g.0 == c.name) {
            Some(g) => g.1.push(c),
            None => groups.push((&c.name, vec![c])),
        }
    }
    groups
}

/// A cell's curve of `y` against training minutes: at every step that all its runs evaluated,
/// the mean over the runs of both (one run: its own curve).
fn mean_curve(runs: &[&Cell], y: impl Fn(&EvalPoint) -> Option<f64>) -> Vec<(f64, f64)> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .result
        .evals
        .iter()
        .filter_map(|p| {
            let at: Vec<&EvalPoint> = runs
                .iter()
                .filter_map(|c| c.result.evals.iter().find(|q| q.step == p.step))
                .collect();
            let ys: Option<Vec<f64>> = at.iter().map(|q| y(q)).collect();
            let ys = ys.filter(|_| at.len() == runs.len())?;
            let n = at.len() as f64;
            Some((at.iter().map(|q| q.train_minutes).sum::<f64>() / n, ys.iter().sum::<f64>() / n))
        })
        .collect()
}

/// `ablation.md`, `ablation.csv` and `ablation.svg` in `dir`. The CSV has a row per run; with
/// seeds the table has a row per cell (mean ± standard deviation over its seeds) and then a
/// row per run, and the plot each cell's mean curve.
pub fn write_ablation(dir: &Path, title: &str, cells: &[Cell]) -> Result<()> {
    let seeded = cells.iter().any(|c| c.seed.is_some());
    let header: Vec<&str> = ["cell", "seed", "overrides"].into_iter().chain(NUMBERS).collect();
    let row = |c: &Cell| -> Vec<String> {
        let seed = c.seed.map_or(String::new(), |s| s.to_string());
        let nums = numbers(&c.result).into_iter().enumerate().map(|(k, v)| number(k, v));
        [c.name.clone(), seed, c.sets.join(" ")].into_iter().chain(nums).collect()
    };
    let md_table = |header: &[&str], rows: &[Vec<String>]| -> String {
        let mut t = format!(
            "| {} |\n|{}|\n",
            header.join(" | "),
            header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for r in rows {
            t += &format!("| {} |\n", r.join(" | "));
        }
        t
    };
    let mut csv = header.join(",") + "\n";
    for c in cells {
        csv += &row(c).iter().map(|v| csv_field(v)).collect::<Vec<_>>().join(",");
        csv += "\n";
    }
    let groups = by_cell(cells);
    let mut md = format!("# {title}\n\n");
    if seeded {
        let summary: Vec<&str> = ["cell", "overrides", "runs"].into_iter().chain(NUMBERS).collect();
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|(name, runs)| {
                let all: Vec<[f64; 9]> = runs.iter().map(|c| numbers(&c.result)).collect();
                let stats = (0..NUMBERS.len())
                    .map(|k| mean_sd(k, &all.iter().map(|v| v[k]).collect::<Vec<_>>()));
                [name.to_string(), runs[0].sets.join(" "), runs.len().to_string()]
                    .into_iter()
                    .chain(stats)
                    .collect()
            })
            .collect();
        md +=
            "Each cell over its seeds (`run.seed`): the mean ± the sample standard deviation.\n\n";
        md += &md_table(&summary, &rows);
        md += "\n## Every run\n\n";
        md += &md_table(&header, &cells.iter().map(row).collect::<Vec<_>>());
    } else {
        let header: Vec<&str> = ["cell", "overrides"].into_iter().chain(NUMBERS).collect();
        let rows: Vec<Vec<String>> = cells
            .iter()
            .map(|c| {
                let mut r = row(c);
                r.remove(1);
                r
            })
            .collect();
        md += &md_table(&header, &rows);
    }
    let folders =
        if seeded { "Each run's folder (`<cell>/seed-<k>`)" } else { "Each cell's folder" };
    md += &format!("\n![validation AP50 against training minutes](ablation.svg)\n\n{folders} holds its full run: `config.resolved.toml`, `log.jsonl`, `eval.jsonl`, `results.json`, `results.md`, `curves.svg`.\n");
    write_atomic(&dir.join("ablation.csv"), csv.as_bytes())?;
    write_atomic(&dir.join("ablation.md"), md.as_bytes())?;
    let path = dir.join("ablation.svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let (left, right) = root.split_horizontally(500);
        let curves = |y: &dyn Fn(&EvalPoint) -> Option<f64>| -> Vec<Series> {
            groups.iter().map(|(name, runs)| (name.to_string(), mean_curve(runs, y))).collect()
        };
        let val = curves(&|p| Some(p.val.get("AP50")));
        let held = curves(&|p| (p.heldout_ap50 >= 0.0).then_some(p.heldout_ap50));
        let what = if seeded { " (mean over seeds)" } else { "" };
        panel(
            &left,
            &format!("validation AP50{what}"),
            "training minutes",
            "AP50",
            &val,
            Some((0.0, 1.0)),
        )?;
        panel(
            &right,
            &format!("held-out pairs AP50{what}"),
            "training minutes",
            "AP50",
            &held,
            Some((0.0, 1.0)),
        )?;
        root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    Ok(write_atomic(&path, svg.as_bytes())?)
}

fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mean and the sample standard deviation (n - 1), written to the column's precision;
    /// one run is its own value; a run without the number makes it "n/a".
    #[test]
    fn a_cell_over_seeds_is_its_mean_and_sample_deviation() {
        let ap50 = NUMBERS.iter().position(|&n| n == "val_AP50").unwrap();
        assert_eq!(mean_sd(ap50, &[0.5, 0.7]), "0.600 ± 0.141");
        assert_eq!(mean_sd(ap50, &[0.25]), "0.250");
        assert_eq!(mean_sd(ap50, &[0.5, -1.0]), "n/a");
        let steps = NUMBERS.iter().position(|&n| n == "steps").unwrap();
        assert_eq!(mean_sd(steps, &[100.0, 120.0, 110.0]), "110.0 ± 10.0");
    }
}
