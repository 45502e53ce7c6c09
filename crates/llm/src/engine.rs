//! The engine: a loaded model with its tokenizer, and the generation loop that turns a prompt into
//! a stream of reasoning and answer text. A [`Session`] is one token sequence and its KV cache, kept
//! between calls so a later prompt that shares a prefix only computes what is new.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::DType;
use candle_nn::VarBuilder;

use crate::chat::Message;
use crate::config::{GenerationConfig, ModelConfig};
use crate::device::{DTypeChoice, DeviceChoice};
use crate::error::{Error, Result};
use crate::generate::{Event, Generation, GenerationParams, OwnedEvent};
use crate::gguf;
use crate::manifest::ModelManifest;
use crate::model::{CausalLm, KvCache, KvFormat, Logits};
use crate::model::{GgufFile, GgufWeights, SafetensorsWeights, WeightSource};
use crate::quant::Quantization;
use crate::sampling::SamplingParams;
use crate::sequence::{Phase, Sequence};
use crate::source::{HubOptions, ModelFiles, ModelSource, WeightFiles};
use crate::stream::TokenText;
use crate::tokenizer::TextTokenizer;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where to run.
    pub device: DeviceChoice,
    /// In which precision.
    pub dtype: DTypeChoice,
    /// Longest sequence (prompt + generation); default and maximum: the model's
    /// `max_position_embeddings`.
    pub context_window: Option<usize>,
    /// How to reach the hub.
    pub hub: HubOptions,
    /// Quantize full-precision (safetensors) weights to this format while loading. GGUF files are
    /// used as they are quantized.
    pub quantize: Option<Quantization>,
    /// Run `dtype` exactly as asked, even half precision on a CPU (slow: for tests and
    /// benchmarks); otherwise that computes in f32.
    pub strict_dtype: bool,
    /// Leave quantized weights as loaded instead of laying them out for the CPU kernels at load
    /// (see [`CausalLm::prepare`]): for tools that only convert weights and never run them.
    pub skip_weight_layout: bool,
    /// What the KV cache stores keys and values as; `None` (auto) is f16 for quantized weights
    /// on a CPU with AVX-512 or AVX2 and F16C, the activations' dtype otherwise (see
    /// [`CausalLm::set_kv_format`]).
    pub kv_cache: Option<KvFormat>,
    /// Bytes of memory the weights' CPU layout may take; `None`: what the OS reports available.
    /// Beyond it, GGUF weights run in place from the mapped file (see [`CausalLm::prepare`]).
    pub layout_memory: Option<u64>,
}

/// Lays out `model`'s weights for the CPU kernels within `opts.layout_memory` (see
/// [`CausalLm::prepare`]), passing on its note when they run in place instead.
fn prepare_weights(
    model: &CausalLm,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<()> {
    if opts.skip_weight_layout {
        return Ok(());
    }
    let available = opts.layout_memory.or_else(crate::device::available_memory);
    if let Some(note) = model.prepare(available)? {
        tracing::warn!("{note}");
        progress(LoadProgress::Note(note));
    }
    Ok(())
}

/// Applies `opts.kv_cache` to a loaded model (`None` keeps the model's default).
fn apply_kv_cache(model: &mut CausalLm, opts: &LoadOptions) -> Result<()> {
    opts.kv_cache
        .map_or(Ok(()), |format| model.set_kv_format(format))
}

/// What the engine reports while loading.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProgress {
    /// Files are being located (and downloaded, when not cached).
    Fetching(String),
    /// Weights: `done` of `total` parts loaded.
    Weights {
        /// Parts loaded.
        done: usize,
        /// Parts in all.
        total: usize,
    },
    /// A choice the loader made that the user should know of: files that disagree, fields read
    /// under a newer tool's names.
    Note(String),
}

/// A loaded model, ready to generate.
pub struct Engine {
    model: CausalLm,
    tokenizer: TextTokenizer,
    files: ModelFiles,
    name: String,
    generation_config: GenerationConfig,
    manifest: Option<ModelManifest>,
    context_window: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("dir", &self.files.dir)
            .field("dtype", &self.model.dtype())
            .finish_non_exhaustive()
    }
}

impl TokenText for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        TextTokenizer::decode(self, ids)
    }
}

impl Engine {
    /// Loads a model from a directory, a built-in name or a hub repo (see [`ModelSource::parse`]).
    pub fn load(
        source: &ModelSource,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        progress(LoadProgress::Fetching(source.name()));
        let files = ModelFiles::fetch(source, &opts.hub)?;
        let manifest = match source {
            ModelSource::Manifest(m) => Some((**m).clone()),
            _ => None,
        };
        Self::from_files(files, source.name(), manifest, opts, progress)
    }

    /// Loads a model from files already on disk.
    pub fn from_files(
        files: ModelFiles,
        name: String,
        manifest: Option<ModelManifest>,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let loaded = LoadedConfig::read(&files)?;
        let config = loaded.config;
        let generation_config = loaded.generation;
        let tokenizer = loaded.tokenizer.ok_or_else(|| Error::MissingFile {
            dir: files.dir.clone(),
            file: "tokenizer.json".into(),
            hint: "the GGUF file carries no tokenizer: put the model's tokenizer.json beside it"
                .into(),
        })?;
        if let Some(m) = &manifest {
            check_manifest_tokens(m, &tokenizer, tokenizer.path())?;
        }
        for note in &config.notes {
            tracing::debug!("{name}: {note}");
        }
        for note in tokenizer.notes() {
            tracing::info!("{name}: {note}");
            progress(LoadProgress::Note(note.clone()));
        }
        let device = opts.device.open()?;
        let context_window = match opts.context_window {
            None => config.max_position_embeddings,
            Some(n) if (2..=config.max_position_embeddings).contains(&n) => n,
            Some(n) => {
                return Err(Error::invalid(
                    "context_window",
                    n,
                    format!(
                        "2..={} (the model's max_position_embeddings)",
                        config.max_position_embeddings
                    ),
                ))
            }
        };
        // candle's CPU kernels have no fast half-precision matmul (bf16 decoded the 1.5B model at
        // 0.37 tokens/s against f32's 6.4 on an AVX-512 BF16 CPU): half precision asked for on a
        // CPU computes in f32, and says so.
        let half_on_cpu = device.is_cpu()
            && !opts.strict_dtype
            && matches!(opts.dtype, DTypeChoice::Bf16 | DTypeChoice::F16)
            && opts.quantize.is_none()
            && matches!(files.weights, WeightFiles::Safetensors(_));
        let f32_opts;
        let opts = if half_on_cpu {
            progress(LoadProgress::Note(format!(
                "dtype {} on a CPU computes in f32 (candle has no fast half-precision CPU matmul; the default, Q8_0, is faster still)",
                opts.dtype
            )));
            f32_opts = LoadOptions {
                dtype: DTypeChoice::F32,
                ..opts.clone()
            };
            &f32_opts
        } else {
            opts
        };
        let cpu_default = crate::quant_cache::applies(
            &config,
            &files.weights,
            opts.dtype,
            opts.quantize,
            device.is_cpu(),
        );
        let mut model = if cpu_default {
            load_cached_quantization(
                &config,
                loaded.weights,
                &tokenizer,
                &name,
                opts,
                &device,
                progress,
            )?
        } else {
            load_weights(&config, loaded.weights, opts, &device, progress)?
        };
        // The cache's format is checked before the layout's seconds of work.
        apply_kv_cache(&mut model, opts)?;
        prepare_weights(&model, opts, progress)?;
        Ok(Self {
            model,
            tokenizer,
            files,
            name,
            generation_config,
            manifest,
            context_window,
        })
    }

    /// The model.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The model's files.
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// The name the model was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Longest sequence (prompt + generation) this engine runs.
    pub fn context_window(&self) -> usize {
        self.context_window
    }

    /// The model's default generation parameters (generation_config.json, then the manifest).
    pub fn default_params(&self) -> GenerationParams {
        let g = &self.generation_config;
        let mut p = GenerationParams::default();
        let sampling = &mut p.sampling;
        if g.do_sample == Some(false) {
            *sampling = SamplingParams::greedy();
        }
        if let Some(t) = g.temperature {
            sampling.temperature = t;
        }
        if let Some(tp) = g.top_p {
            sampling.top_p = tp;
        }
        if let Some(k) = g.top_k {
            sampling.top_k = k;
        }
        if let Some(r) = g.repetition_penalty {
            sampling.repetition_penalty = r;
        }
        if let Some(max) = self.manifest.as_ref().and_then(|m| m.sampling.max_tokens) {
            p.max_tokens = max;
        }
        p
    }

    /// A new, empty token sequence with its KV cache.
    pub fn new_session(&self) -> Session {
        Session {
            cache: self.model.new_cache(self.context_window),
            tokens: Vec::new(),
        }
    }

    /// Renders `messages` with the chat template and encodes them (one BOS).
    pub fn encode_messages(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tokenizer.encode_chat(messages, true)
    }

    /// One-shot generation for `messages` in a fresh session.
    pub fn generate(
        &self,
        messages: &[Message],
        params: &GenerationParams,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let ids = self.encode_messages(messages)?;
        let mut session = self.new_session();
        self.generate_in(&mut session, &ids, params, on_event)
    }

    /// Generates a continuation of `prompt` (token ids, BOS included) in `session`, reusing the
    /// part of its KV cache that `prompt` shares, and streams text through `on_event` (a `Break`
    /// cancels). A thin driver of one [`Sequence`] through the same steps the batching
    /// [`crate::scheduler::Scheduler`] takes, with a batch of one.
    pub fn generate_in(
        &self,
        session: &mut Session,
        prompt: &[u32],
        params: &GenerationParams,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let seq = Sequence::new(self, prompt.to_vec(), params.clone())?;
        let mut seq = seq.with_session(std::mem::replace(session, self.new_session()));
        let result = self.drive(&mut seq, on_event);
        *session = seq.into_session();
        result
    }

    /// Steps `seq` alone until it finishes, delivering its events.
    fn drive(
        &self,
        seq: &mut Sequence,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        loop {
            let events = match seq.phase() {
                Phase::Prefilling => seq.prefill(self, usize::MAX)?,
                Phase::Decoding => {
                    let Some(id) = seq.step_input() else { break };
                    let logits = self.model.forward_decode(&[id], &mut [seq.cache_mut()])?;
                    seq.stepped(self, &logits.get(0)?.to_vec1::<f32>()?)?
                }
                Phase::Finished => break,
            };
            for ev in &events {
                let Some(e) = ev.as_event() else { continue };
                if on_event(e).is_break() && !matches!(ev, OwnedEvent::Done(_)) {
                    for done in seq.cancel() {
                        if let Some(e) = done.as_event() {
                            let _ = on_event(e);
                        }
                    }
                    return Ok(seq.generation().clone());
                }
            }
        }
        Ok(seq.generation().clone())
    }
}

/// Length of the longest common prefix.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One token sequence and its KV cache.
///
/// Not `Clone` (see [`KvCache`]): [`Session::try_clone`] copies the cache into buffers of its own.
#[derive(Debug)]
pub struct Session {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    /// Tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.cache.truncate(len);
    }

    /// A copy of the session whose cache lives in buffers of its own: feeding either afterwards
    /// never changes the other.
    pub fn try_clone(&self) -> Result<Session> {
        Ok(Session {
            cache: self.cache.try_clone()?,
            tokens: self.tokens.clone(),
        })
    }

    /// A session holding a copy of the first `len` tokens and their cache in buffers of its own
    /// (see [`KvCache::copy_prefix`]).
    pub fn copy_prefix(&self, len: usize) -> Result<Session> {
        let len = len.min(self.tokens.len());
        Ok(Session {
            cache: self.cache.copy_prefix(len)?,
            tokens: self.tokens[..len].to_vec(),
        })
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Runs `ids` after the cached tokens and returns the last position's logits.
    pub fn feed(&mut self, model: &CausalLm, ids: &[u32]) -> Result<candle_core::Tensor> {
        let logits = model.forward(ids, &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits)
    }

    /// Runs `ids` after the cached tokens and returns the logits `which` asks for.
    pub fn feed_logits(
        &mut self,
        model: &CausalLm,
        ids: &[u32],
        which: Logits,
    ) -> Result<candle_core::Tensor> {
        let logits = model.forward(ids, &mut self.cache, which)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits)
    }

    /// The KV cache, for a batched decode step that appends one position to it.
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Records `id` as cached after a batched decode step appended its position.
    pub(crate) fn push_cached(&mut self, id: u32) {
        self.tokens.push(id);
        debug_assert_eq!(self.tokens.len(), self.cache.len());
    }

    /// Like [`Self::feed`], returning every position's logits.
    pub fn feed_all(&mut self, model: &CausalLm, ids: &[u32]) -> Result<candle_core::Tensor> {
        let logits = model.forward(ids, &mut self.cache, Logits::All)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits)
    }
}

/// A multi-turn conversation: past assistant turns keep only their answers (the template drops the
/// reasoning), and each turn reuses the KV cache of the prefix it shares with the previous one.
///
/// Not `Clone` (see [`KvCache`]): [`Conversation::try_clone`] forks it with a cache of its own.
#[derive(Debug)]
pub struct Conversation {
    session: Session,
    messages: Vec<Message>,
}

impl Conversation {
    /// An empty conversation on `engine`.
    pub fn new(engine: &Engine) -> Self {
        Self {
            session: engine.new_session(),
            messages: Vec::new(),
        }
    }

    /// A fork of the conversation: the same messages, and a copy of the cache in buffers of its
    /// own, so the fork and the original can each go on without touching the other.
    pub fn try_clone(&self) -> Result<Conversation> {
        Ok(Conversation {
            session: self.session.try_clone()?,
            messages: self.messages.clone(),
        })
    }

    /// The messages so far (assistant messages as generated: reasoning, `</think>`, answer).
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The session (its tokens show what the cache holds).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Forgets the conversation and its cache.
    pub fn reset(&mut self) {
        self.messages.clear();
        self.session.clear();
    }

    /// Starts the conversation with a system prompt, replacing any earlier one (DeepSeek advises
    /// against one for R1; some uses need it).
    pub fn set_system(&mut self, system: impl Into<String>) {
        if self.messages.first().map(|m| m.role) == Some(crate::chat::Role::System) {
            self.messages.remove(0);
        }
        self.messages.insert(0, Message::system(system));
    }

    /// Drops the oldest `turns` user/assistant exchanges (to fit the context window).
    pub fn drop_oldest_turns(&mut self, turns: usize) {
        crate::chat::drop_oldest_turns(&mut self.messages, turns);
    }

    /// Adds a user turn, generates the assistant's, and records it.
    ///
    /// A turn that fails (an error such as a prompt longer than the context window) or is
    /// cancelled leaves the history exactly as it was; the cancelled generation is still
    /// returned, for its text.
    pub fn send(
        &mut self,
        engine: &Engine,
        user: &str,
        params: &GenerationParams,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        self.send_dropping_oldest(engine, 0, user, params, on_event)
    }

    /// Like [`Self::send`], with the oldest `drop_turns` exchanges left out of the prompt; they
    /// are forgotten only when the turn succeeds, so a failed or cancelled turn loses nothing.
    pub fn send_dropping_oldest(
        &mut self,
        engine: &Engine,
        drop_turns: usize,
        user: &str,
        params: &GenerationParams,
        on_event: &mut dyn FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut messages = self.messages.clone();
        crate::chat::drop_oldest_turns(&mut messages, drop_turns);
        messages.push(Message::user(user));
        let g = engine
            .encode_messages(&messages)
            .and_then(|ids| engine.generate_in(&mut self.session, &ids, params, on_event))?;
        if g.stop_reason != Some(crate::StopReason::Cancelled) {
            messages.push(Message::assistant(g.assistant_content()));
            self.messages = messages;
        }
        Ok(g)
    }
}

/// Checks a downloaded tokenizer against the ids its manifest pins.
fn check_manifest_tokens(m: &ModelManifest, tok: &TextTokenizer, path: &Path) -> Result<()> {
    let st = &m.special_tokens;
    let mut expected = vec![(&st.bos, Some(tok.special().bos))];
    expected.push((&st.eos, tok.special().eos.first().copied()));
    if let Some(t) = &st.think_close {
        expected.push((t, tok.special().think_close));
    }
    for (want, got) in expected {
        if got != Some(want.id) || tok.inner().token_to_id(&want.text) != Some(want.id) {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!(
                    "{:?} should be id {} for {} but is {:?}: the tokenizer does not match the model",
                    want.text, want.id, m.name, got
                ),
            });
        }
    }
    Ok(())
}

/// What a model's files say about it before its weights load.
struct LoadedConfig {
    config: ModelConfig,
    generation: GenerationConfig,
    /// `None` when a GGUF file has no tokenizer and no tokenizer.json is beside it.
    tokenizer: Option<TextTokenizer>,
    weights: OpenWeights,
}

/// Weights ready to load: safetensors files, or a GGUF file whose header is already read.
enum OpenWeights {
    Safetensors(Vec<std::path::PathBuf>),
    Gguf(GgufFile),
}

impl OpenWeights {
    fn open(files: &WeightFiles) -> Result<Self> {
        Ok(match files {
            WeightFiles::Safetensors(paths) => Self::Safetensors(paths.clone()),
            WeightFiles::Gguf(path) => Self::Gguf(GgufFile::open(path)?),
        })
    }
}

impl LoadedConfig {
    /// Reads config.json or the GGUF metadata, and the tokenizer (tokenizer.json beside the
    /// weights first, the GGUF metadata second).
    fn read(files: &ModelFiles) -> Result<Self> {
        let generation_file = match &files.generation_config {
            Some(p) => Some(GenerationConfig::from_file(p)?),
            None => None,
        };
        let (config, generation, gguf_tokenizer, weights) = match (&files.weights, &files.config) {
            (WeightFiles::Gguf(path), _) => {
                let file = GgufFile::open(path)?;
                let info = gguf::model_info(file.content(), path)?;
                let tok = if files.tokenizer.is_none() {
                    gguf::tokenizer_from_metadata(file.content(), path)?
                } else {
                    None
                };
                let generation = generation_file.unwrap_or(info.generation);
                let tok = tok.map(|t| (t, path.clone()));
                (info.config, generation, tok, OpenWeights::Gguf(file))
            }
            (WeightFiles::Safetensors(paths), Some(config)) => (
                ModelConfig::from_file(config)?,
                generation_file.unwrap_or_default(),
                None,
                OpenWeights::Safetensors(paths.clone()),
            ),
            (WeightFiles::Safetensors(_), None) => {
                return Err(Error::MissingFile {
                    dir: files.dir.clone(),
                    file: "config.json".into(),
                    hint: "a model directory needs the model's config.json".into(),
                })
            }
        };
        let tokenizer = match (&files.tokenizer, gguf_tokenizer) {
            (Some(path), _) => Some(TextTokenizer::load(
                path,
                files.tokenizer_config.as_deref(),
                &generation,
                &config,
            )?),
            (None, Some(((inner, tok_cfg), path))) => Some(TextTokenizer::from_parts(
                inner,
                &tok_cfg,
                &generation,
                &config,
                &path,
            )?),
            (None, None) => None,
        };
        Ok(Self {
            config,
            generation,
            tokenizer,
            weights,
        })
    }
}

/// The activation dtype: what the user asked for, except that quantized weights always compute
/// in f32 (candle's quantized kernels take f32 input; a T4 never runs pure fp16 this way).
fn activation_dtype(gguf: bool, opts: &LoadOptions, device: &candle_core::Device) -> Result<DType> {
    let quantized = opts.quantize.is_some() || gguf;
    if !quantized {
        return opts.dtype.resolve(device);
    }
    match opts.dtype {
        DTypeChoice::Auto | DTypeChoice::F32 => Ok(DType::F32),
        other => Err(Error::invalid(
            "dtype",
            format!("{other:?}").to_ascii_lowercase(),
            "auto or f32 with quantized weights (a GGUF file or quantize-at-load): they compute in f32",
        )),
    }
}

/// Opens the weights (each safetensors file checked on its own, so an error names the broken
/// file) and builds the model.
fn load_weights(
    config: &ModelConfig,
    weights: OpenWeights,
    opts: &LoadOptions,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<CausalLm> {
    let dtype = activation_dtype(matches!(weights, OpenWeights::Gguf(_)), opts, device)?;
    let mut report = |done, total| progress(LoadProgress::Weights { done, total });
    let first = match &weights {
        OpenWeights::Safetensors(paths) => paths.first().cloned().unwrap_or_default(),
        OpenWeights::Gguf(file) => file.path().to_path_buf(),
    };
    let result = match weights {
        OpenWeights::Safetensors(paths) => {
            for path in &paths {
                // SAFETY: the file is mapped read-only; thinkrag never writes model files while
                // they are loaded, and the docs tell users not to modify a model in use.
                unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                    Error::Weights {
                        path: path.clone(),
                        message: e.to_string(),
                    }
                })?;
            }
            // SAFETY: as above.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device) }
                .map_err(|e| Error::Weights {
                    path: first.clone(),
                    message: e.to_string(),
                })?;
            let src = SafetensorsWeights::new(vb, opts.quantize, config.num_hidden_layers);
            CausalLm::new(config, &src as &dyn WeightSource, &mut report)
        }
        OpenWeights::Gguf(file) => {
            if let Some(q) = opts.quantize {
                return Err(Error::invalid(
                    "quantize",
                    q,
                    "nothing for a GGUF file, whose weights are already quantized (quantizing at load applies to safetensors weights)",
                ));
            }
            let src = GgufWeights::new(file, device, dtype);
            CausalLm::new(config, &src as &dyn WeightSource, &mut report)
        }
    };
    result.map_err(|e| match e {
        Error::Candle(e) => Error::Weights {
            path: first,
            message: format!("{e} (does the configuration describe these weights?)"),
        },
        other => other,
    })
}

/// The CPU default for half-precision safetensors: the Q8_0 copy cached as GGUF when there is
/// one, else quantize while loading and write that copy for the next start. A cache that cannot
/// be written (read-only, full) costs only the next start's time: it is reported, not fatal.
fn load_cached_quantization(
    config: &ModelConfig,
    weights: OpenWeights,
    tokenizer: &TextTokenizer,
    name: &str,
    opts: &LoadOptions,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<CausalLm> {
    let q = crate::quant_cache::CPU_DEFAULT;
    let OpenWeights::Safetensors(paths) = &weights else {
        return load_weights(config, weights, opts, device, progress);
    };
    let cached = crate::quant_cache::path(paths, &opts.hub, q)?;
    let published = config.torch_dtype.as_deref().unwrap_or("half precision");
    if cached.is_file() {
        match GgufFile::open(&cached)
            .and_then(|file| load_weights(config, OpenWeights::Gguf(file), opts, device, progress))
        {
            Ok(model) => {
                progress(LoadProgress::Note(format!(
                    "running the {published} weights as {q}, cached at {} (full precision: dtype f32)",
                    cached.display()
                )));
                return Ok(model);
            }
            Err(e) => progress(LoadProgress::Note(format!(
                "the cached {q} copy {} is unusable ({e}); quantizing again",
                cached.display()
            ))),
        }
    }
    let quantizing = LoadOptions {
        quantize: Some(q),
        ..opts.clone()
    };
    let model = load_weights(config, weights, &quantizing, device, progress)?;
    let written = cached
        .parent()
        .map_or(Ok(()), |dir| {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
        })
        .and_then(|()| gguf::export(&model, tokenizer, name, &cached));
    match written {
        Ok(()) => {
            progress(LoadProgress::Note(format!(
                "quantized the {published} weights to {q} for this CPU (full precision: dtype f32) and cached them at {}: the next start loads them directly",
                cached.display()
            )));
            // Run from the file just written: memory-mapped, its pages go back to the OS once
            // the weights are laid out, where the blocks quantized in memory would stay beside
            // their laid-out copy.
            drop(model);
            let file = GgufFile::open(&cached)?;
            load_weights(config, OpenWeights::Gguf(file), opts, device, progress)
        }
        Err(e) => {
            progress(LoadProgress::Note(format!(
                "quantized the {published} weights to {q} for this CPU (full precision: dtype f32); could not cache them ({e}), so the next start quantizes again"
            )));
            Ok(model)
        }
    }
}

/// Loads only the network (no tokenizer needed) of a model directory (config.json and
/// safetensors) or a GGUF file: what benchmarks of synthesized weights need.
pub fn load_model_only(
    path: &Path,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<CausalLm> {
    let (config, weights) = if path.is_file() {
        let file = GgufFile::open(path)?;
        let info = gguf::model_info(file.content(), path)?;
        (info.config, OpenWeights::Gguf(file))
    } else {
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(Error::MissingFile {
                dir: path.to_path_buf(),
                file: "config.json".into(),
                hint: "a model directory needs the model's config.json (or give a .gguf file)"
                    .into(),
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let weights = match ModelFiles::from_dir(path) {
            Ok(files) => OpenWeights::open(&files.weights)?,
            Err(Error::MissingFile { file, .. }) if file == "tokenizer.json" => {
                OpenWeights::Safetensors(vec![path.join("model.safetensors")])
            }
            Err(e) => return Err(e),
        };
        (config, weights)
    };
    let device = opts.device.open()?;
    let mut model = load_weights(&config, weights, opts, &device, progress)?;
    apply_kv_cache(&mut model, opts)?;
    prepare_weights(&model, opts, progress)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_weights_compute_in_f32_and_refuse_half_precision() {
        let cpu = candle_core::Device::Cpu;
        let (gguf, st) = (true, false);
        let opts = |dtype, quantize| LoadOptions {
            dtype,
            quantize,
            ..LoadOptions::default()
        };
        let q = Some(Quantization::Q4K);
        assert_eq!(
            activation_dtype(gguf, &opts(DTypeChoice::Auto, None), &cpu).unwrap(),
            DType::F32
        );
        assert_eq!(
            activation_dtype(st, &opts(DTypeChoice::Auto, q), &cpu).unwrap(),
            DType::F32
        );
        assert_eq!(
            activation_dtype(st, &opts(DTypeChoice::F32, q), &cpu).unwrap(),
            DType::F32
        );
        for half in [DTypeChoice::F16, DTypeChoice::Bf16] {
            let err = activation_dtype(gguf, &opts(half, None), &cpu).unwrap_err();
            assert!(err.to_string().contains("f32"), "{err}");
            assert!(activation_dtype(st, &opts(half, q), &cpu).is_err());
        }
        // Full precision keeps the user's choice.
        assert_eq!(
            activation_dtype(st, &opts(DTypeChoice::Bf16, None), &cpu).unwrap(),
            DType::BF16
        );
    }
}
