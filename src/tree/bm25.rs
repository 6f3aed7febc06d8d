//! BM25 over chunks (Robertson & Zaragoza 2009, k1 = 1.2, b = 0.75): the lexical scorer for
//! `rag`, and one of the tree's node scorers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const K1: f64 = 1.2;
const B: f64 = 0.75;

/// Words too common to say anything about a passage.
const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "did", "do", "does", "for", "from",
    "had", "has", "have", "he", "her", "his", "how", "i", "in", "is", "it", "its", "of", "on",
    "or", "she", "that", "the", "their", "them", "they", "this", "to", "was", "were", "what",
    "when", "where", "which", "who", "whom", "why", "with", "you",
];

/// Lowercased words of `text`, stopwords dropped.
pub fn terms(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
}

/// Term statistics of a set of passages (ordered maps, so the stored form is the same
/// from one build to the next).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bm25 {
    /// Per passage: term → count.
    counts: Vec<BTreeMap<String, u32>>,
    lengths: Vec<usize>,
    /// Term → number of passages containing it.
    df: BTreeMap<String, u32>,
    avg_len: f64,
}

impl Bm25 {
    pub fn new<'a>(passages: impl IntoIterator<Item = &'a str>) -> Self {
        let mut counts = Vec::new();
        let mut lengths = Vec::new();
        let mut df: BTreeMap<String, u32> = BTreeMap::new();
        for p in passages {
            let mut c: BTreeMap<String, u32> = BTreeMap::new();
            let mut len = 0;
            for t in terms(p) {
                *c.entry(t).or_default() += 1;
                len += 1;
            }
            for t in c.keys() {
                *df.entry(t.clone()).or_default() += 1;
            }
            counts.push(c);
            lengths.push(len);
        }
        let avg_len = lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64;
        Self {
            counts,
            lengths,
            df,
            avg_len,
        }
    }

    /// How rare `term` is among the passages (BM25's idf: higher is rarer).
    pub fn idf(&self, term: &str) -> f64 {
        let n = self.counts.len() as f64;
        let df = *self.df.get(term).unwrap_or(&0) as f64;
        ((n - df + 0.5) / (df + 0.5) + 1.0).ln()
    }

    /// The BM25 score of every passage for `query`, in passage order.
    pub fn scores(&self, query: &str) -> Vec<f64> {
        self.scores_with(query, "", 0.0)
    }

    /// [`scores`](Self::scores) for `query`, plus `weight` × the score for the words of
    /// `context` it lacks (a follow-up question and the turn before it), brought to the
    /// query's scale first: however many words the context has, a passage that only matches
    /// them never outscores the best match of the query by more than `weight` of it.
    pub fn scores_with(&self, query: &str, context: &str, weight: f64) -> Vec<f64> {
        let mut q: Vec<String> = terms(query).collect();
        q.sort();
        q.dedup();
        let own = self.scores_of(&q);
        if weight <= 0.0 {
            return own;
        }
        let mut c: Vec<String> = terms(context).filter(|t| !q.contains(t)).collect();
        c.sort();
        c.dedup();
        let more = self.scores_of(&c);
        let top = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let scale = match (top(&own), top(&more)) {
            (o, m) if o > 0.0 && m > 0.0 => o / m,
            _ => 1.0,
        };
        own.iter()
            .zip(&more)
            .map(|(o, m)| o + weight * scale * m)
            .collect()
    }

    /// Every passage's BM25 score for the (distinct) terms `q`.
    fn scores_of(&self, q: &[String]) -> Vec<f64> {
        self.counts
            .iter()
            .zip(&self.lengths)
            .map(|(c, &len)| {
                q.iter()
                    .map(|t| {
                        let tf = *c.get(t).unwrap_or(&0) as f64;
                        if tf == 0.0 {
                            return 0.0;
                        }
                        let idf = self.idf(t);
                        let norm = K1 * (1.0 - B + B * len as f64 / self.avg_len.max(1.0));
                        idf * tf * (K1 + 1.0) / (tf + norm)
                    })
                    .sum()
            })
            .collect()
    }
}

/// One index per level `0..=height` over the nodes' texts (node order within the level,
/// chunk by chunk), for chunks whose nodes span the byte ranges `nodes` of `text`.
pub fn level_indexes(text: &str, nodes: &[Vec<(usize, usize)>], height: usize) -> Vec<Bm25> {
    (0..=height)
        .map(|w| {
            let first = super::layout::node_number(w, 0);
            Bm25::new(nodes.iter().flat_map(|c| {
                c[first..first + (1 << w)]
                    .iter()
                    .map(|&(a, b)| text.get(a..b).unwrap_or(""))
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passage_with_the_rare_query_word_wins() {
        let idx = Bm25::new([
            "The King of Bohemia came to Baker Street.",
            "Holmes smoked his pipe and said nothing.",
            "The photograph was hidden behind a sliding panel.",
        ]);
        let s = idx.scores("Where was the photograph hidden?");
        assert!(s[2] > s[0] && s[2] > s[1], "{s:?}");
        assert_eq!(s[1], 0.0);
    }

    #[test]
    fn context_words_count_below_the_question_s() {
        let idx = Bm25::new([
            "Netherfield Park is let at last.",
            "Mr. Bingley danced every dance.",
            "The house was let to a tenant.",
        ]);
        let q = "Which house is let to him?";
        let alone = idx.scores(q);
        let with = idx.scores_with(q, "Who rented Netherfield?", 0.5);
        let full = idx.scores_with(q, "Who rented Netherfield?", 1.0);
        assert!(with[0] > alone[0], "the passage naming the referent rises");
        assert_eq!(with[2], alone[2], "the question's own words weigh the same");
        assert!(full[0] > with[0]);
        assert_eq!(idx.scores_with(q, "Netherfield", 0.0), alone);
        assert_eq!(
            idx.scores_with(q, "house let", 1.0),
            alone,
            "no word counts twice"
        );
    }

    #[test]
    fn stopwords_and_case_do_not_count() {
        let t: Vec<String> = terms("What IS the Passphrase?").collect();
        assert_eq!(t, vec!["passphrase"]);
    }
}
