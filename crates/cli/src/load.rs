//! Model loading options shared by the subcommands (`--model`, `--device`, `--dtype`, `--threads`,
//! hub flags), and the progress bar shown while a model loads.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use thinkrag_llm::{
    DTypeChoice, DeviceChoice, Engine, HubOptions, KvFormat, LoadOptions, LoadProgress, ModelFiles,
    ModelManifest, ModelSource, Quantization,
};

/// Where and how a model runs.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// auto (on a CPU: bf16/f16 safetensors run as Q8_0, quantized once and cached; on GPUs of
    /// compute capability >= 8.0: bf16; else f32), f32, bf16 or f16 (on a CPU these compute in f32).
    /// Quantized weights (GGUF, --quantize) always compute in f32.
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeChoice,
    /// CPU threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantize full-precision weights while loading: q8_0, q6k, q5_k_m, q5k, q4_k_m, q4k, q3k, q2k,
    /// q5_1, q5_0, q4_1 or q4_0 (q4_k_m and q5_k_m are llama.cpp's mixes; its spellings such as Q4_K
    /// work too). Save the result with
    /// `thinkrag quantize` to skip this work next time.
    #[arg(long)]
    pub quantize: Option<Quantization>,
    /// What the KV cache stores: auto (f16 for quantized weights on a CPU with AVX-512 or with
    /// AVX2 and F16C, as llama.cpp does: half the memory, and faster at long contexts; else the
    /// compute dtype),
    /// f32 (the reference's numbers exactly), f16, bf16 or q8_0 (llama.cpp's 8-bit blocks: 0.56
    /// of f16's memory and bytes read per decode step, for head sizes that are multiples of 32).
    #[arg(long, default_value = "auto")]
    pub kv_cache: KvCacheArg,
}

/// `--kv-cache`: `auto` or a [`KvFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheArg(pub Option<KvFormat>);

impl std::str::FromStr for KvCacheArg {
    type Err = thinkrag_llm::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(KvCacheArg(None)),
            other => other.parse().map(|f| KvCacheArg(Some(f))),
        }
    }
}

impl RuntimeArgs {
    /// The load options these flags set (context window and hub at their defaults).
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            dtype: self.dtype,
            quantize: self.quantize,
            kv_cache: self.kv_cache.0,
            ..LoadOptions::default()
        }
    }
}

/// Where the model comes from and how it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A model directory, a GGUF file, a built-in model name, a Hugging Face repo
    /// (owner/name[@revision]) or one GGUF file of a repo (owner/name[@revision]/file.gguf).
    #[arg(short, long, default_value = ModelManifest::default_model(), env = "THINKRAG_MODEL")]
    pub model: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Longest sequence, prompt and generation together (default: the model's maximum).
    #[arg(long)]
    pub context_window: Option<usize>,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// How to reach the Hugging Face hub.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Never use the network: only the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Hugging Face token for gated repos (default: HF_TOKEN or the cache's token file).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
}

impl HubArgs {
    pub fn options(&self) -> HubOptions {
        let mut hub = HubOptions::from_env();
        hub.offline |= self.offline;
        if self.hf_token.is_some() {
            hub.token = self.hf_token.clone();
        }
        hub.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
        hub
    }
}

/// Sets the CPU thread count before any tensor work.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(thinkrag_llm::device::physical_cores);
    thinkrag_llm::device::set_cpu_threads(n)?;
    Ok(n)
}

/// A progress callback that draws a bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar() -> (ProgressBar, impl FnMut(LoadProgress)) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let b = bar.clone();
    let callback = move |p: LoadProgress| match p {
        LoadProgress::Fetching(name) => b.set_message(format!("locating {name}")),
        LoadProgress::Weights { done, total } => {
            b.set_message("loading weights");
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
        LoadProgress::Note(note) => b.suspend(|| eprintln!("note: {note}")),
    };
    (bar, callback)
}

/// Loads the engine the arguments describe.
pub fn load_engine(args: &ModelArgs) -> Result<Engine> {
    init_threads(args.runtime.threads)?;
    let source = ModelSource::parse(&args.model)?;
    let opts = LoadOptions {
        context_window: args.context_window,
        hub: args.hub.options(),
        ..args.runtime.load_options()
    };
    let (bar, mut progress) = progress_bar();
    let engine = Engine::load(&source, &opts, &mut progress)
        .with_context(|| format!("cannot load model {}", args.model))?;
    bar.finish_and_clear();
    Ok(engine)
}

/// `thinkrag download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// A built-in model or embedder name (`thinkrag models`) or a Hugging Face repo
    /// (owner/name[@revision]).
    #[arg(default_value = ModelManifest::default_model())]
    pub model: String,
    #[command(flatten)]
    pub hub: HubArgs,
}

pub fn download(args: DownloadArgs) -> Result<()> {
    if let Some(m) = thinkrag::embed::EmbedderManifest::find(&args.model) {
        let source = thinkrag::embed::EmbedderSource::Manifest(Box::new(m));
        let dir = source
            .fetch(&args.hub.options())
            .with_context(|| format!("cannot download {}", args.model))?;
        println!("{}", dir.display());
        return Ok(());
    }
    let source = ModelSource::parse(&args.model)?;
    let files = ModelFiles::fetch(&source, &args.hub.options())
        .with_context(|| format!("cannot download {}", args.model))?;
    println!("{}", files.dir.display());
    Ok(())
}
