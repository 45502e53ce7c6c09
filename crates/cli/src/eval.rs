//! `thinkrag eval QUESTIONS.jsonl`: retrieval quality of the index on labeled questions, recall@k,
//! MRR and nDCG@10 for each search mode (vector, lexical, hybrid), overall and by question kind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use thinkrag::eval::{load_questions, score, MeanScores, QuestionScores, NDCG_DEPTH};
use thinkrag::index::SearchMode;

use crate::retrieval_args::{EmbedderArgs, IndexArgs, RerankArgs};
use crate::search::parse_mode;

/// `thinkrag eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labeled questions, JSONL: one {"question": ..., "relevant": [{"source": FILE, "pages":
    /// [N]}], "kind": ...} per line (pages 1-based; without pages the whole document counts).
    pub questions: PathBuf,
    /// Hits per question that recall is measured over (MRR and nDCG look at 10 or more).
    #[arg(short, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub k: u32,
    /// The search modes to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "vector,lexical,hybrid", value_parser = parse_mode)]
    pub modes: Vec<SearchMode>,
    /// Exact (brute-force) vector search instead of the HNSW graph.
    #[arg(long)]
    pub exact: bool,
    /// Print the results as JSON (with every question's scores).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rerank: RerankArgs,
    #[command(flatten)]
    pub index: IndexArgs,
    #[command(flatten)]
    pub embedder: EmbedderArgs,
}

#[derive(Serialize)]
struct ModeReport {
    mode: SearchMode,
    reranked: bool,
    all: MeanScores,
    by_kind: BTreeMap<String, MeanScores>,
    ms_per_query: f64,
    questions: Vec<(String, QuestionScores)>,
}

/// Runs the command.
pub fn run(args: EvalArgs) -> Result<()> {
    let questions = load_questions(&args.questions)?;
    if questions.is_empty() {
        anyhow::bail!("{} holds no questions", args.questions.display());
    }
    let store = args.index.open_nonempty()?;
    let embedder = args.embedder.load(Some(store.embedder()))?;
    let reranker = args
        .rerank
        .load(&args.embedder.device, &args.embedder.hub)?;
    let k = args.k as usize;
    let depth = k.max(NDCG_DEPTH);
    let mut runs: Vec<(SearchMode, bool)> = args.modes.iter().map(|&m| (m, false)).collect();
    if reranker.is_some() {
        runs.extend(args.modes.iter().map(|&m| (m, true)));
    }
    let mut reports = Vec::new();
    for (mode, reranked) in runs {
        let mut scores = Vec::with_capacity(questions.len());
        let started = Instant::now();
        for q in &questions {
            let rerank = if reranked {
                args.rerank.with(reranker.as_deref())
            } else {
                None
            };
            let hits = thinkrag::search_reranked(
                store.as_ref(),
                &embedder,
                &q.question,
                &thinkrag::SearchOptions {
                    exact: args.exact,
                    ..thinkrag::SearchOptions::new(depth, mode)
                },
                rerank,
            )
            .with_context(|| format!("{mode} search for question {:?} failed", q.id))?;
            scores.push(score(&hits, &q.relevant, k));
        }
        let ms_per_query = started.elapsed().as_secs_f64() * 1e3 / questions.len() as f64;
        let mut kinds: BTreeMap<String, Vec<QuestionScores>> = BTreeMap::new();
        for (q, s) in questions.iter().zip(&scores) {
            if let Some(kind) = &q.kind {
                kinds.entry(kind.clone()).or_default().push(*s);
            }
        }
        reports.push(ModeReport {
            mode,
            reranked,
            all: MeanScores::of(&scores),
            by_kind: kinds
                .iter()
                .map(|(kind, s)| (kind.clone(), MeanScores::of(s)))
                .collect(),
            ms_per_query,
            questions: questions.iter().map(|q| q.id.clone()).zip(scores).collect(),
        });
    }
    if args.json {
        let out = serde_json::json!({
            "questions": questions.len(),
            "k": k,
            "index": store.location(),
            "embedder": store.embedder().model,
            "modes": reports,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} questions, index {} ({} chunks, embedder {})",
        questions.len(),
        store.location(),
        store.stats()?.chunks,
        store.embedder().model
    );
    println!(
        "{:<16} {:<10} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "mode",
        "questions",
        "n",
        format!("recall@{k}"),
        "MRR",
        "nDCG@10",
        "ms/query"
    );
    for r in &reports {
        let row = |label: &str, m: &MeanScores, ms: Option<f64>| {
            println!(
                "{:<16} {:<10} {:>9} {:>9.3} {:>8.3} {:>9.3} {:>9}",
                if r.reranked {
                    format!("{}+rerank", r.mode)
                } else {
                    r.mode.to_string()
                },
                label,
                m.questions,
                m.recall,
                m.mrr,
                m.ndcg,
                ms.map(|ms| format!("{ms:.1}")).unwrap_or_default()
            )
        };
        row("all", &r.all, Some(r.ms_per_query));
        for (kind, m) in &r.by_kind {
            row(kind, m, None);
        }
    }
    Ok(())
}
