//! What the OpenSearch routes keep beside the documents: search pipelines (one JSON file) and
//! ml-commons conversation memories (one JSON file each), written atomically so a crash leaves
//! the old or the new version, and read back on start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thinkrag_docstore::{fsutil, random_id, Result};

/// One interaction of a memory, as ml-commons stores it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Interaction {
    /// Its id.
    pub message_id: String,
    /// The memory it belongs to.
    pub memory_id: String,
    /// When it was stored (ISO 8601).
    pub create_time: String,
    /// The question.
    pub input: String,
    /// How the prompt was built.
    #[serde(default)]
    pub prompt_template: String,
    /// The answer.
    pub response: String,
    /// Who stored it (`retrieval_augmented_generation` for RAG searches).
    #[serde(default)]
    pub origin: String,
    /// Anything else (thinkrag keeps the reasoning and the citations here).
    #[serde(default)]
    pub additional_info: Value,
}

/// A conversation memory.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Memory {
    /// Its id.
    pub memory_id: String,
    /// Its name.
    pub name: String,
    /// When it was created (ISO 8601).
    pub create_time: String,
    /// When it last changed.
    pub updated_time: String,
    /// Its interactions, oldest first.
    #[serde(default)]
    pub messages: Vec<Interaction>,
}

impl Memory {
    /// The memory without its messages, as ml-commons lists it.
    pub fn summary(&self) -> Value {
        serde_json::json!({
            "memory_id": self.memory_id,
            "name": self.name,
            "create_time": self.create_time,
            "updated_time": self.updated_time,
        })
    }
}

/// Search pipelines and memories on disk.
#[derive(Debug)]
pub struct MetaStore {
    dir: PathBuf,
    pipelines: Mutex<BTreeMap<String, Value>>,
    memories: Mutex<BTreeMap<String, Memory>>,
}

/// Now, as ml-commons writes times.
pub fn iso_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

impl MetaStore {
    /// Reads what `dir` holds (nothing yet is fine).
    pub fn open(dir: &Path) -> Result<Self> {
        let pipelines: BTreeMap<String, Value> =
            fsutil::read_json(&dir.join("search_pipelines.json"))?.unwrap_or_default();
        let mem_dir = dir.join("memories");
        std::fs::create_dir_all(&mem_dir).map_err(|e| thinkrag_docstore::DocStoreError::Io {
            action: "cannot create",
            path: mem_dir.clone(),
            source: e,
        })?;
        let mut memories = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&mem_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                if let Some(m) = fsutil::read_json::<Memory>(&path)? {
                    memories.insert(m.memory_id.clone(), m);
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            pipelines: Mutex::new(pipelines),
            memories: Mutex::new(memories),
        })
    }

    /// A pipeline's body.
    pub fn pipeline(&self, name: &str) -> Option<Value> {
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// All pipelines.
    pub fn pipelines(&self) -> BTreeMap<String, Value> {
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stores (or replaces) a pipeline.
    pub fn put_pipeline(&self, name: &str, body: Value) -> Result<()> {
        let mut p = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = p.clone();
        next.insert(name.to_string(), body);
        fsutil::write_json(&self.dir.join("search_pipelines.json"), &next)?;
        *p = next;
        Ok(())
    }

    /// Deletes a pipeline; returns whether it existed.
    pub fn delete_pipeline(&self, name: &str) -> Result<bool> {
        let mut p = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if !p.contains_key(name) {
            return Ok(false);
        }
        let mut next = p.clone();
        next.remove(name);
        fsutil::write_json(&self.dir.join("search_pipelines.json"), &next)?;
        *p = next;
        Ok(true)
    }

    fn memory_path(&self, id: &str) -> PathBuf {
        self.dir.join("memories").join(format!("{id}.json"))
    }

    /// Creates a memory.
    pub fn create_memory(&self, name: &str) -> Result<Memory> {
        let now = iso_now();
        let m = Memory {
            memory_id: random_id(),
            name: name.to_string(),
            create_time: now.clone(),
            updated_time: now,
            messages: Vec::new(),
        };
        fsutil::write_json(&self.memory_path(&m.memory_id), &m)?;
        self.memories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(m.memory_id.clone(), m.clone());
        Ok(m)
    }

    /// A memory.
    pub fn memory(&self, id: &str) -> Option<Memory> {
        self.memories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// All memories, newest first.
    pub fn memories(&self) -> Vec<Memory> {
        let mut all: Vec<Memory> = self
            .memories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| b.create_time.cmp(&a.create_time));
        all
    }

    /// Deletes a memory; returns whether it existed.
    pub fn delete_memory(&self, id: &str) -> Result<bool> {
        let mut m = self.memories.lock().unwrap_or_else(|e| e.into_inner());
        if m.remove(id).is_none() {
            return Ok(false);
        }
        let path = self.memory_path(id);
        std::fs::remove_file(&path).map_err(|e| thinkrag_docstore::DocStoreError::Io {
            action: "cannot delete",
            path,
            source: e,
        })?;
        Ok(true)
    }

    /// Adds an interaction to a memory; `None` when there is no such memory.
    pub fn add_interaction(
        &self,
        memory_id: &str,
        input: String,
        response: String,
        origin: &str,
        prompt_template: String,
        additional_info: Value,
    ) -> Result<Option<Interaction>> {
        let mut all = self.memories.lock().unwrap_or_else(|e| e.into_inner());
        let Some(memory) = all.get(memory_id) else {
            return Ok(None);
        };
        let mut next = memory.clone();
        let now = iso_now();
        let interaction = Interaction {
            message_id: random_id(),
            memory_id: memory_id.to_string(),
            create_time: now.clone(),
            input,
            prompt_template,
            response,
            origin: origin.to_string(),
            additional_info,
        };
        next.messages.push(interaction.clone());
        next.updated_time = now;
        fsutil::write_json(&self.memory_path(memory_id), &next)?;
        all.insert(memory_id.to_string(), next);
        Ok(Some(interaction))
    }

    /// An interaction by id.
    pub fn interaction(&self, message_id: &str) -> Option<Interaction> {
        self.memories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flat_map(|m| m.messages.iter())
            .find(|i| i.message_id == message_id)
            .cloned()
    }
}
