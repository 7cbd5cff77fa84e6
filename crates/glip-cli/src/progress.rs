//! What a run shows while it trains: a progress bar with loss, rate and ETA on a terminal, plain
//! log lines otherwise (CI logs, files).

use glip_train::experiment::Progress;
use glip_train::trainer::LogLine;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A progress bar on a terminal, one line per logged step elsewhere.
#[derive(Debug)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    prefix: String,
}

impl Reporter {
    /// Chooses the bar when stderr is a terminal. `prefix` names the run (ablation cells).
    pub fn new(prefix: &str) -> Self {
        Self { bar: None, prefix: prefix.to_string() }
    }

    fn tty() -> bool {
        std::io::stderr().is_terminal()
    }

    fn say(&self, msg: &str) {
        let line = if self.prefix.is_empty() {
            msg.to_string()
        } else {
            format!("[{}] {msg}", self.prefix)
        };
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Progress for Reporter {
    fn message(&mut self, msg: &str) {
        self.say(msg);
    }

    fn segment(&mut self, from: u64, to: u64, total: u64) {
        if !Self::tty() {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix}{bar:30} {pos}/{len} steps  loss {msg}  {per_sec}  ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            if !self.prefix.is_empty() {
                b.set_prefix(format!("[{}] ", self.prefix));
            }
            b
        });
        bar.set_position(from);
        let _ = to;
    }

    fn step(&mut self, step: u64, loss: f32) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(format!("{loss:.4}"));
        }
    }

    fn log(&mut self, l: &LogLine) {
        if self.bar.is_none() {
            self.say(&format!(
                "step {}: loss {:.4}, lr {:.2e}, {:.1} img/s",
                l.step, l.losses["loss"], l.lr, l.images_per_s
            ));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
