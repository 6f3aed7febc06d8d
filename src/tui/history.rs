//! The conversation about one book, kept between runs: one JSON file per document key in
//! the data dir, written atomically, and its Markdown export beside it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One node an answer drew on, as remembered in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    pub chunk: usize,
    pub level: usize,
    pub index: usize,
    pub alpha: usize,
    pub score: f32,
    pub pages: (u32, u32),
}

/// A question and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub question: String,
    pub answer: String,
    /// Why the answer ended ("end of turn", "token limit", "stopped").
    pub stop: String,
    #[serde(default)]
    pub sources: Vec<SourceRef>,
    /// `Some(false)`: none of the passages read holds the answer's key words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<bool>,
    /// Which conversation the turn belongs to (turns of one conversation are consecutive;
    /// a follow-up question carries the earlier turns of its own).
    #[serde(default)]
    pub conversation: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    document: String,
    turns: Vec<Turn>,
}

const VERSION: u32 = 1;

/// The platform data dir's `history` folder (`~/.local/share/slm-chat/history`).
pub fn default_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "slm-chat")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| std::env::temp_dir().join("slm-chat"))
        .join("history")
}

/// The history file of the document with `key`.
pub fn path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

/// The turns saved for `key`; none when there is no history yet.
pub fn load(dir: &Path, key: &str) -> std::io::Result<Vec<Turn>> {
    let p = path(dir, key);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: File = serde_json::from_str(&text).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", p.display()),
        )
    })?;
    Ok(file.turns)
}

/// Save all turns for `key` (temp file + fsync + rename, so a crash leaves the old file).
pub fn save(dir: &Path, key: &str, document: &str, turns: &[Turn]) -> std::io::Result<PathBuf> {
    let file = File {
        version: VERSION,
        document: document.to_string(),
        turns: turns.to_vec(),
    };
    let json = serde_json::to_vec_pretty(&file)?;
    let target = path(dir, key);
    write_atomic(&target, &json)?;
    Ok(target)
}

/// Write the conversation as Markdown next to the history file; returns where.
pub fn export(dir: &Path, key: &str, document: &str, turns: &[Turn]) -> std::io::Result<PathBuf> {
    let target = dir.join(format!("{key}.md"));
    write_atomic(&target, to_markdown(document, turns).as_bytes())?;
    Ok(target)
}

/// The conversations as a Markdown document, a rule between two.
pub fn to_markdown(document: &str, turns: &[Turn]) -> String {
    let mut md = format!("# slm-chat: {document}\n");
    for (i, t) in turns.iter().enumerate() {
        if i > 0 && turns[i - 1].conversation != t.conversation {
            md.push_str("\n---\n");
        }
        md.push_str(&format!(
            "\n## {}\n\n{}\n",
            t.question.trim(),
            t.answer.trim()
        ));
        if !t.sources.is_empty() {
            md.push_str("\nSources:\n");
            for s in &t.sources {
                md.push_str(&format!(
                    "- chunk {}, level {} #{}, pages {}, α {}, score {:.2}\n",
                    s.chunk,
                    s.level,
                    s.index,
                    page_range(s.pages),
                    s.alpha,
                    s.score
                ));
            }
        }
        md.push_str(&format!("\n_({})_\n", t.stop));
    }
    md
}

/// "12" or "12–14".
pub fn page_range((a, b): (u32, u32)) -> String {
    if a == b {
        format!("{a}")
    } else {
        format!("{a}–{b}")
    }
}

/// The store's crash-safe write, into a folder made first (history lives outside the store).
fn write_atomic(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))?;
    crate::store::write_atomic(target, bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_round_trips_and_exports_markdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(load(dir.path(), "k").expect("no file yet").is_empty());
        let turns = vec![Turn {
            question: "Who?".into(),
            answer: "Holmes.".into(),
            stop: "end of turn".into(),
            supported: None,
            conversation: 0,
            sources: vec![SourceRef {
                chunk: 3,
                level: 1,
                index: 0,
                alpha: 4,
                score: 1.5,
                pages: (7, 8),
            }],
        }];
        save(dir.path(), "k", "book.txt", &turns).expect("save");
        assert_eq!(load(dir.path(), "k").expect("load"), turns);
        let md = export(dir.path(), "k", "book.txt", &turns).expect("export");
        let text = std::fs::read_to_string(md).expect("read export");
        assert!(text.contains("## Who?\n\nHolmes.\n"));
        assert!(text.contains("pages 7–8, α 4"));
        assert!(!text.contains("---"), "one conversation, no rule");
        let mut two = turns.clone();
        two.push(Turn {
            conversation: 1,
            ..turns[0].clone()
        });
        assert_eq!(to_markdown("book.txt", &two).matches("\n---\n").count(), 1);
    }

    #[test]
    fn turns_saved_before_conversations_load_as_the_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let old = r#"{"version": 1, "document": "b", "turns": [{"question": "Q", "answer": "A", "stop": "end of turn"}]}"#;
        std::fs::write(path(dir.path(), "k"), old).expect("write");
        assert_eq!(load(dir.path(), "k").expect("load")[0].conversation, 0);
    }

    #[test]
    fn a_corrupt_history_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(path(dir.path(), "k"), "{not json").expect("write");
        assert!(load(dir.path(), "k").is_err());
    }
}
