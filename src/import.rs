//! `fhirledger import`: NDJSON files (plain or gzip) read line by line and handed to the
//! service's bulk import in batches, with a progress bar on a terminal, a summary at the end
//! and a report of every rejected line. A first pass names each file by the SHA-256 of its
//! bytes (how far it was loaded is kept under that name) and gathers the identifiers every
//! file carries, so conditional references between files resolve in any order.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::access::RequestContext;
use crate::api::AppState;
use crate::error::AppError;
use crate::fhir::identifier_index::IdentifierIndex;
use crate::fhir::ndjson::{Line, LineSplitter};
use crate::service::import::{ImportLine, LineOutcome};

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Files, or directories whose `*.ndjson` and `*.ndjson.gz` files are read.
    pub paths: Vec<PathBuf>,
    /// Lines written per transaction.
    pub batch_lines: usize,
    /// Longest line accepted (the server's request body limit: what one PUT may send).
    pub max_line_bytes: usize,
    /// Where to write the rejected lines, one JSON object per line.
    pub report: Option<PathBuf>,
    /// Whether to draw a progress bar (on a terminal).
    pub progress: bool,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub files: usize,
    /// Lines loaded by an earlier, interrupted run of the same files, skipped now.
    pub lines_already_done: u64,
    pub created: u64,
    pub updated: u64,
    pub rejected: u64,
    pub elapsed: Duration,
}

impl ImportSummary {
    pub fn written(&self) -> u64 {
        self.created + self.updated
    }
}

/// One input file, as the first pass found it.
struct Source {
    path: PathBuf,
    /// SHA-256 of the file's bytes, in hex: the name its progress is kept under.
    digest: String,
    lines: u64,
}

/// Imports every file of `options` into the services of `state`, then sequences the
/// ledger entries it wrote.
pub fn run_import(state: &AppState, options: &ImportOptions) -> anyhow::Result<ImportSummary> {
    let started = Instant::now();
    let files = input_files(&options.paths)?;
    let mut identifiers = IdentifierIndex::default();
    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        sources.push(scan(&path, options.max_line_bytes, &mut identifiers)?);
    }
    let report = match &options.report {
        Some(path) => Some(io::BufWriter::new(
            File::create(path)
                .with_context(|| format!("cannot create the report {}", path.display()))?,
        )),
        None => None,
    };
    let total: u64 = sources.iter().map(|source| source.lines).sum();
    let bar = if options.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} lines  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut loader = Loader {
        state,
        ctx: RequestContext::internal(format!("import-{}", uuid::Uuid::new_v4())),
        identifiers,
        report,
        bar,
        summary: ImportSummary {
            files: sources.len(),
            ..ImportSummary::default()
        },
    };
    let mut before = 0;
    for source in &sources {
        loader.load_source(source, before, options)?;
        before += source.lines;
    }
    loader.bar.finish_and_clear();
    if let Some(report) = loader.report.as_mut() {
        report.flush().context("cannot write the report")?;
    }
    // Entries are durable already; sequencing them puts them in a signed checkpoint now,
    // rather than when a server next runs (one that runs meanwhile does it itself).
    state.ledger.sequence_pending()?;
    state.resources.finish_import()?;
    let mut summary = loader.summary;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The state of one import run across its files.
struct Loader<'a> {
    state: &'a AppState,
    ctx: RequestContext,
    identifiers: IdentifierIndex,
    report: Option<io::BufWriter<File>>,
    bar: ProgressBar,
    summary: ImportSummary,
}

impl Loader<'_> {
    /// Loads the lines of `source` after those an earlier run loaded; `before` is how many
    /// lines the files before it hold (for the progress bar).
    fn load_source(
        &mut self,
        source: &Source,
        before: u64,
        options: &ImportOptions,
    ) -> anyhow::Result<()> {
        let done = self.state.resources.import_lines_done(&source.digest)?;
        self.summary.lines_already_done += done.min(source.lines);
        self.bar.set_position(before + done.min(source.lines));
        if done >= source.lines {
            return Ok(());
        }
        let mut lines = LineReader::new(open(&source.path)?, options.max_line_bytes);
        let mut batch = Vec::with_capacity(options.batch_lines);
        let mut through = done;
        let mut loaded_through = done;
        while let Some((number, line)) = lines.next_line()? {
            if number <= done {
                continue;
            }
            through = number;
            match line {
                Line::Blank => {}
                Line::Text(text) => batch.push(ImportLine { number, text }),
                Line::TooLong => self.reject(
                    source,
                    number,
                    &AppError::PayloadTooLarge {
                        limit: options.max_line_bytes,
                    },
                )?,
                Line::NotUtf8 => self.reject(
                    source,
                    number,
                    &AppError::bad_request("the line is not valid UTF-8"),
                )?,
            }
            if batch.len() >= options.batch_lines {
                self.load_batch(source, &batch, through)?;
                self.bar.set_position(before + through);
                loaded_through = through;
                batch.clear();
            }
        }
        if through > loaded_through {
            // The last lines, or only the record that the rejected and blank ones are done.
            self.load_batch(source, &batch, through)?;
        }
        self.bar.set_position(before + source.lines);
        Ok(())
    }

    fn load_batch(
        &mut self,
        source: &Source,
        batch: &[ImportLine],
        through: u64,
    ) -> anyhow::Result<()> {
        let outcomes = self.state.resources.import_batch(
            &self.ctx,
            &self.identifiers,
            Some(&source.digest),
            batch,
            through,
        )?;
        for (number, outcome) in outcomes {
            match outcome {
                LineOutcome::Written { created: true, .. } => self.summary.created += 1,
                LineOutcome::Written { created: false, .. } => self.summary.updated += 1,
                LineOutcome::Rejected(error) => self.reject(source, number, &error)?,
            }
        }
        Ok(())
    }

    /// Counts a rejected line, names it on the terminal and writes it to the report.
    fn reject(&mut self, source: &Source, number: u64, error: &AppError) -> anyhow::Result<()> {
        self.summary.rejected += 1;
        self.bar
            .set_message(format!("{} rejected", self.summary.rejected));
        if self.summary.rejected <= SHOWN_REJECTIONS {
            self.bar.suspend(|| {
                eprintln!("{}:{number}: rejected: {error}", source.path.display());
            });
        }
        if let Some(report) = self.report.as_mut() {
            let line = serde_json::json!({
                "file": source.path.display().to_string(),
                "line": number,
                "outcome": error.outcome(),
            });
            writeln!(report, "{line}").context("cannot write the report")?;
        }
        Ok(())
    }
}

/// How many rejected lines the terminal names before only counting them.
const SHOWN_REJECTIONS: u64 = 10;

/// The files named: each file as given, and the `*.ndjson`/`*.ndjson.gz` files of each
/// directory, by name.
fn input_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let metadata =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !metadata.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|file| {
                let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                file.is_file() && (name.ends_with(".ndjson") || name.ends_with(".ndjson.gz"))
            })
            .collect();
        if found.is_empty() {
            anyhow::bail!("{} holds no .ndjson or .ndjson.gz files", path.display());
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// The first pass over a file: its digest, its lines, and the identifiers its resources
/// carry.
fn scan(
    path: &Path,
    max_line_bytes: usize,
    identifiers: &mut IdentifierIndex,
) -> anyhow::Result<Source> {
    let mut hasher = Sha256::new();
    let mut raw = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    io::copy(&mut raw, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    let digest = hex(&hasher.finalize());
    let mut lines = LineReader::new(open(path)?, max_line_bytes);
    let mut count = 0;
    while let Some((number, line)) = lines.next_line()? {
        count = number;
        if let Line::Text(text) = line {
            // Only a resource with identifiers can be the target of one.
            if text.contains("\"identifier\"")
                && let Ok(resource) = serde_json::from_str(&text)
            {
                identifiers.add(&resource);
            }
        }
    }
    Ok(Source {
        path: path.to_owned(),
        digest,
        lines: count,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file's content, decompressed when it is gzip (by its first bytes, whatever its name).
fn open(path: &Path) -> anyhow::Result<Box<dyn BufRead>> {
    let mut file = BufReader::new(
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let gzip = file
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?
        .starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// Reads the lines of a file one at a time, at most `max` bytes each (see [`LineSplitter`]).
struct LineReader {
    reader: Box<dyn BufRead>,
    splitter: LineSplitter,
    ended: bool,
}

impl LineReader {
    fn new(reader: Box<dyn BufRead>, max: usize) -> Self {
        Self {
            reader,
            splitter: LineSplitter::new(max),
            ended: false,
        }
    }

    fn next_line(&mut self) -> anyhow::Result<Option<(u64, Line)>> {
        let mut out = Vec::with_capacity(1);
        while out.is_empty() && !self.ended {
            let chunk = self
                .reader
                .fill_buf()
                .context("cannot read an input file")?;
            if chunk.is_empty() {
                self.ended = true;
                out.extend(self.splitter.finish());
            } else {
                let used = self.splitter.push(chunk, &mut out, Some(1));
                self.reader.consume(used);
            }
        }
        Ok(out.pop())
    }
}
