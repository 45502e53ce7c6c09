//! `thinkrag serve`: loads the model (and an embedder when asked), then serves the OpenAI- and
//! Bedrock-compatible HTTP APIs of thinkrag-server until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use thinkrag_llm::{DeviceChoice, SchedulerConfig};
use thinkrag_server::{AppState, ServerOptions};

use crate::load::{load_engine, ModelArgs};
use crate::retrieval_args::EmbedderChoice;

/// `thinkrag serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: anything else exposes the model to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the URL line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require this key: `Authorization: Bearer KEY` or `x-api-key: KEY` (Bedrock clients may use
    /// it as their AWS access key id). /health stays open.
    #[arg(long, env = "THINKRAG_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model's name in /v1/models (default: the --model value). Requests may name any model.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Sequences generated at once (one batched decode step for all of them).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_sequences: u16,
    /// Requests that may wait for a free sequence; beyond that: 429 / ThrottlingException.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in bytes; beyond that: 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Prompt tokens computed per step while others decode (smaller keeps their tokens flowing).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub prefill_chunk: u32,
    /// MiB of KV cache kept after requests finish, so prompts sharing a prefix reuse it (0: off).
    #[arg(long, default_value_t = 1024)]
    pub prefix_cache_mib: usize,
    /// Seconds in-flight requests may take after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Serve /v1/embeddings with this embedder (default: the index's, when --index is given).
    #[command(flatten)]
    pub embedder: EmbedderChoice,
    /// An index whose embedder /v1/embeddings serves.
    #[arg(long, value_name = "DIR")]
    pub index: Option<PathBuf>,
    /// Answer RAG requests from this chunk store too: an index directory or a PostgreSQL
    /// database (postgres://...; see `ingest --store`) that `thinkrag ingest` fills, from
    /// this machine or others. Documents ingested while the server runs are found.
    #[arg(long, value_name = "DIR|URL")]
    pub store: Option<String>,
    /// The name requests use for --store: `"rag": {"index": NAME}` or the model `rag/NAME`.
    #[arg(long, value_name = "NAME", default_value = "docs", requires = "store")]
    pub store_name: String,
    /// Where the OpenSearch-compatible routes keep their indices, search pipelines and
    /// conversation memories (default: thinkrag/serve in the user's data directory). Used when
    /// an embedder is loaded.
    #[arg(long, value_name = "DIR", env = "THINKRAG_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the embedder runs (default: cpu; the model takes the GPU).
    #[arg(long, default_value = "cpu")]
    pub embedder_device: DeviceChoice,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| anyhow::anyhow!("--host {:?} is not an address to listen on", args.host))?;
    // Fail on a taken port before spending a minute loading the model.
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr} (is another server using the port? try --port)")
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;

    // The store opens first: a wrong URL or password fails before anything else loads.
    let store = match &args.store {
        Some(s) => {
            let location = crate::retrieval_args::store_location(s);
            let store = location
                .open()
                .with_context(|| format!("cannot open the store {}", location.display()))?;
            eprintln!(
                "store {} ({} chunks) answers as \"{}\"",
                store.location(),
                store.stats()?.chunks,
                args.store_name
            );
            Some(store)
        }
        None => None,
    };
    eprintln!("loading model {}", args.model.model);
    let engine = Arc::new(load_engine(&args.model)?);
    let embedder = match (&args.embedder.embedder, &args.index, &store) {
        (None, None, None) => None,
        (_, index_dir, _) => {
            let index = match index_dir {
                Some(dir) => Some(
                    thinkrag::open_index(dir)
                        .with_context(|| format!("cannot open the index {}", dir.display()))?,
                ),
                None => None,
            };
            let info = match (&store, &index) {
                (Some(s), _) => Some(s.embedder()),
                (None, Some(i)) => Some(i.embedder()),
                (None, None) => None,
            };
            let spec = args.embedder.spec(info);
            eprintln!("loading embedder {spec}");
            let e = args
                .embedder
                .load(info, &args.embedder_device, &args.model.hub)?;
            let name = thinkrag::embed::EmbedderManifest::find(&spec)
                .map(|m| m.name.clone())
                .unwrap_or_else(|| {
                    std::path::Path::new(&spec)
                        .file_name()
                        .map_or(spec.clone(), |n| n.to_string_lossy().into_owned())
                });
            Some((name, Arc::new(e)))
        }
    };
    if let (Some(store), Some((_, e))) = (&store, &embedder) {
        store
            .check_embedder(&thinkrag::embedder_info(e.spec()))
            .with_context(|| format!("--embedder cannot search the store {}", store.location()))?;
    }
    let model_id = args
        .model_id
        .clone()
        .unwrap_or_else(|| model_name(&args.model.model));
    if args.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: give a key, or leave the flag out to serve without one");
    }
    let opensearch = match &embedder {
        Some((_, e)) => {
            let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
            let os = thinkrag_server::opensearch::OpenSearch::open(&dir, Arc::clone(e))
                .with_context(|| format!("cannot open the data directory {}", dir.display()))?;
            eprintln!(
                "OpenSearch-compatible indices in {} ({} open)",
                dir.display(),
                os.store.list().len()
            );
            Some(Arc::new(os))
        }
        None => None,
    };
    let mut state = AppState::new(
        engine,
        embedder,
        SchedulerConfig {
            max_sequences: args.max_sequences as usize,
            max_queue: args.max_queue,
            prefill_chunk: args.prefill_chunk as usize,
            prefix_cache_bytes: args.prefix_cache_mib << 20,
            ..SchedulerConfig::default()
        },
        ServerOptions {
            model_id: model_id.clone(),
            api_key: args.api_key.clone(),
            max_body_bytes: args.max_body_bytes,
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
        },
    )?;
    state.opensearch = opensearch;
    if let Some(store) = store {
        state
            .stores
            .insert(args.store_name.clone(), Arc::from(store));
    }
    let state = Arc::new(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("thinkrag-http")
        .build()
        .context("cannot start the async runtime")?;
    let has_indices = state.opensearch.is_some();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("thinkrag serving {model_id} on http://{addr}");
        println!("  OpenAI:  base_url=\"http://{addr}/v1\"");
        println!("  Bedrock: endpoint_url=\"http://{addr}\"");
        if has_indices {
            println!("  OpenSearch: hosts=[\"http://{addr}\"]");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        thinkrag_server::serve(listener, state, shutdown_signal()).await
    })?;
    eprintln!("thinkrag serve: stopped");
    Ok(())
}

/// The model's display name: a path's last component, else the spec as given.
fn model_name(spec: &str) -> String {
    let p = std::path::Path::new(spec);
    if p.exists() {
        if let Some(n) = p.file_stem() {
            return n.to_string_lossy().into_owned();
        }
    }
    spec.to_string()
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("thinkrag serve: shutting down (in-flight requests may finish)");
}

/// `thinkrag/serve` in the user's data directory (`~/.local/share` on Linux), else
/// `.thinkrag-serve` here.
fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("thinkrag").join("serve"))
        .unwrap_or_else(|| PathBuf::from(".thinkrag-serve"))
}
