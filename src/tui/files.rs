//! The TUI's disk work on its own thread: loading, saving and exporting the conversation.
//!
//! A save can wait on a slow or full disk; the event loop must keep drawing and reading
//! keys meanwhile. One thread does the jobs in the order they were asked, so an older save
//! never lands after a newer one; the outcome comes back to the loop as a message.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use sha2::Digest;
use tokio::sync::mpsc::UnboundedSender;

use super::app::Msg;
use super::history::{self, Turn};

enum Job {
    /// Find the document's key (the engine's, or a hash of the file) and load its history.
    Load {
        engine_key: String,
    },
    Save(Vec<Turn>),
    Export(Vec<Turn>),
}

/// Where the conversation of one document is kept, and the thread that writes it.
pub struct Files {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

struct Worker {
    dir: PathBuf,
    file: PathBuf,
    title: String,
    key: Option<String>,
    tx: UnboundedSender<Msg>,
}

impl Files {
    /// Start the thread for the history of `file` (shown as `title`) in `dir`; outcomes
    /// go to `tx`.
    pub fn start(dir: PathBuf, file: PathBuf, title: String, tx: UnboundedSender<Msg>) -> Self {
        let (jobs, rx) = channel::<Job>();
        let mut worker = Worker {
            dir,
            file,
            title,
            key: None,
            tx,
        };
        let thread = std::thread::Builder::new()
            .name("slm-chat-files".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    worker.run(job);
                }
            })
            .ok();
        Self {
            jobs: Some(jobs),
            thread,
        }
    }

    /// Load the saved conversation once the engine names the document.
    pub fn load(&self, engine_key: &str) {
        self.send(Job::Load {
            engine_key: engine_key.to_string(),
        });
    }

    pub fn save(&self, turns: &[Turn]) {
        self.send(Job::Save(turns.to_vec()));
    }

    pub fn export(&self, turns: &[Turn]) {
        self.send(Job::Export(turns.to_vec()));
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            if jobs.send(job).is_err() {
                tracing::warn!("the history thread has stopped");
            }
        }
    }

    /// Finish the jobs asked for (a quit must not lose the last save), then stop.
    pub fn close(mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the history thread panicked");
            }
        }
    }
}

impl Worker {
    fn run(&mut self, job: Job) {
        let notice = match job {
            Job::Load { engine_key } => {
                let key = self.document_key(&engine_key);
                let msg = match history::load(&self.dir, &key) {
                    Ok(turns) => Msg::History(turns),
                    Err(e) => Msg::Notice(format!("history not loaded: {e}")),
                };
                self.key = Some(key);
                let _ = self.tx.send(msg);
                return;
            }
            Job::Save(turns) => {
                let Some(key) = &self.key else { return };
                match history::save(&self.dir, key, &self.title, &turns) {
                    Ok(_) => return,
                    Err(e) => format!("history not saved: {e}"),
                }
            }
            Job::Export(turns) => {
                let Some(key) = &self.key else { return };
                match history::export(&self.dir, key, &self.title, &turns) {
                    Ok(p) => format!("exported to {}", p.display()),
                    Err(e) => format!("export failed: {e}"),
                }
            }
        };
        let _ = self.tx.send(Msg::Notice(notice));
    }

    /// The engine's key for the document, or a hash of the file's bytes.
    fn document_key(&self, engine_key: &str) -> String {
        if !engine_key.is_empty() {
            return engine_key.to_string();
        }
        match std::fs::read(&self.file) {
            Ok(bytes) => {
                let digest = sha2::Sha256::digest(&bytes);
                digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
            }
            // Unreadable now (it was readable a moment ago): key by name instead.
            Err(_) => self.title.clone(),
        }
    }
}
