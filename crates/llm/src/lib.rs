//! thinkrag-llm: the reasoning-model engine of thinkrag.
//!
//! Runs the DeepSeek-R1 distills (Qwen2 and Llama 3 architectures) with candle on a CPU or a CUDA GPU,
//! and streams the model's reasoning (inside `<think>`) apart from its answer.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use thinkrag_llm::{Engine, Event, LoadOptions, Message, ModelSource};
//!
//! # fn main() -> thinkrag_llm::Result<()> {
//! let source = ModelSource::parse("deepseek-r1-distill-qwen-1.5b")?;
//! let engine = Engine::load(&source, &LoadOptions::default(), &mut |_| {})?;
//! let params = engine.default_params();
//! let answer = engine.generate(&[Message::user("What is 17 * 23?")], &params, &mut |ev| {
//!     match ev {
//!         Event::Reasoning(t) => eprint!("{t}"),
//!         Event::Answer(t) => print!("{t}"),
//!         Event::Done(_) => {}
//!     }
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n{:?}, {} tokens", answer.stop_reason, answer.usage.completion_tokens);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod bench;
pub mod chat;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod manifest;
pub mod model;
pub mod quant;
pub mod quant_cache;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod source;
pub mod stream;
pub mod synth;
pub mod tokenizer;

pub use chat::{drop_oldest_turns, Message, Role};
pub use config::{
    Architecture, GenerationConfig, LlamaConfig, ModelConfig, Qwen2Config, SUPPORTED_ARCHITECTURES,
};
pub use device::{DTypeChoice, DeviceChoice};
pub use engine::{load_model_only, Conversation, Engine, LoadOptions, LoadProgress, Session};
pub use error::{Error, Result};
pub use generate::{
    Event, Generation, GenerationParams, GenerationReport, OwnedEvent, StopReason, Timings, Usage,
};
pub use manifest::ModelManifest;
pub use model::KvFormat;
pub use quant::Quantization;
pub use sampling::SamplingParams;
pub use scheduler::{EventSink, EventStream, Scheduler, SchedulerConfig, SchedulerMetrics};
pub use sequence::Sequence;
pub use source::{HubOptions, ModelFiles, ModelSource, WeightFiles};
pub use tokenizer::TextTokenizer;
