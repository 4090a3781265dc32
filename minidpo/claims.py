"""The course's verdicts on the claims of its source texts: one record per claim, the single place they live.

Notebook 07 renders the table from here and runs the checks; notebooks 04, 05, 06, 06b, 06c and 08 show their evidence
and refer to a record by its id (``claims.get("C11")``). A record says who claims what (the source by its public
identity, with the short quote), the verdict (``holds``, ``holds only if``, ``wrong``), what holds instead, and
where the evidence is. Records reserved for a measurement another notebook makes carry the verdict ``PENDING``
until it is made.

The sources, by their public identity (a reader of the course can find them; nothing here names a file):

    chapter        Nathan Lambert, "A Little Bit of Reinforcement Learning from Human Feedback" (the RLHF book),
                   chapter "Direct Alignment Algorithms": the markdown source, equations by label (eq:dpo_core)
    chapter (web)  the same chapter as rendered on the book's website, equations numbered (1)-(25)
    encyclopedia   the encyclopedia-style article "Direct Preference Optimization"
    tutorial       the tutorial article "Direct Preference Optimization (DPO) — Reinforcement Learning-Free
                   Alignment"
    glossary       the Inferensys glossary entry "Direct Preference Optimization (DPO)"

``quoted(source, fragment)`` checks a quote against the texts where they are present (``../shared/seeds`` beside
the repository, or ``$MINIDPO_SOURCE_TEXTS``) and says "not checked here" where they are not: it never passes
silently.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

HOLDS, ONLY_IF, WRONG, PENDING = "holds", "holds only if", "wrong", "to be measured"
VERDICTS = (HOLDS, ONLY_IF, WRONG)

SOURCES = {
    "chapter": 'Nathan Lambert, *A Little Bit of Reinforcement Learning from Human Feedback*, chapter '
               '"Direct Alignment Algorithms"',
    "chapter (web)": 'the same chapter as rendered on the RLHF book\'s website (equations (1)-(25))',
    "encyclopedia": 'the encyclopedia-style article "Direct Preference Optimization"',
    "tutorial": 'the tutorial article "Direct Preference Optimization (DPO) — Reinforcement Learning-Free '
                'Alignment"',
    "glossary": 'the Inferensys glossary entry "Direct Preference Optimization (DPO)"',
}
SHORT = {"chapter": "RLHF book, DAA chapter", "chapter (web)": "RLHF book, web edition",
         "encyclopedia": "encyclopedia article", "tutorial": "tutorial article", "glossary": "Inferensys glossary"}
_TEXT_PREFIX = {"chapter": "000", "chapter (web)": "004", "encyclopedia": "001", "tutorial": "002",
                "glossary": "003"}  # how the source texts are numbered where they are kept


@dataclass(frozen=True)
class Claim:
    """One claim of a source text and the course's verdict on it."""

    id: str  # "C01" ...
    quotes: tuple[tuple[str, str], ...]  # (source key, the short quote, verbatim)
    claim: str  # the claim as the source states it, in a line
    verdict: str  # holds | holds only if | wrong | to be measured
    correction: str  # for "holds only if": the condition; for "wrong": what holds instead; for "holds": a note
    evidence: str  # where it is shown: notebook and section
    check: str = ""  # the kind of check: sympy, exact world, GPT-2 world over seeds, measurement, citation

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(key for key, _ in self.quotes))

    @property
    def source(self) -> str:
        """The public identity of every source of the claim, in order."""
        return "; ".join(SOURCES[key] for key in self.sources)

    def __str__(self) -> str:
        quote = " / ".join(f'"{q}"' for _, q in self.quotes)
        return f"{self.id} ({self.source}): {quote} -> {self.verdict.upper()}: {self.correction} [{self.evidence}]"


def _c(id, quotes, claim, verdict, correction, evidence, check=""):
    return Claim(id, tuple(quotes), claim, verdict, correction, evidence, check)


CH, WEB, ENC, TUT, GLO = "chapter", "chapter (web)", "encyclopedia", "tutorial", "glossary"

CLAIMS: tuple[Claim, ...] = (
    _c("C01", [(CH, "The loss function derived from a Bradley-Terry reward model follows")],
       "The DPO loss is -log sigma(beta[log pi/pi_ref (y_w) - log pi/pi_ref (y_l)]) (eq:dpo_core)",
       HOLDS, "the chapter's, the encyclopedia's and the tutorial's forms and minidpo.preference_loss agree",
       "07 §2", "torch"),
    _c("C02", [(CH, "DPO is learning a reward model at its core")],
       "The implicit reward is beta log pi/pi_ref, without the beta log Z(x) term (eq:dpo_reward)",
       ONLY_IF, "read as a reward equal to r* up to the prompt-only shift beta log Z(x), which no preference "
       "and no optimal policy can see", "07 §1.2", "sympy + exact world"),
    _c("C03", [(CH, "remove the factor of $-1$ and $\\beta$")],
       "The max -> min rewriting of the RLHF objective and the partition trick (eq:dpo_deriv_1 to _9)",
       ONLY_IF, "beta > 0: dividing by beta turns argmax into argmin only then (the chapter never says so)",
       "07 §2", "sympy + exact world"),
    _c("C04", [(CH, "The Gibb's inequality tells this is minimized at a distance of 0")],
       "The objective is -beta KL(pi || pi*) + beta log Z, maximised at pi = pi* (eq:dpo_deriv_10)",
       HOLDS, "checked on 1000 random policies of the exact world", "07 §2", "sympy + exact world"),
    _c("C05", [(CH, "Hence, we get an optimal policy")], "pi* = pi_ref exp(r/beta) / Z (eq:dpo_opt_policy)", HOLDS,
       "the Lagrangian's stationary point, and the unique maximum (strict concavity, beta > 0)", "07 §2", "sympy"),
    _c("C06", [(CH, "a Bradley-Terry model of human preferences is formed as")], "The Bradley-Terry probability is sigma(r1 - r2) (eq:bradley_terry_dpo)",
       HOLDS, "the web edition's (17) mixes r(y1|x) and r(x, y1), a notation slip", "07 §2", "sympy"),
    _c("C07", [(CH, "we must introduce a partition function")], "r* = beta log pi*/pi_ref + beta log Z (eq:dpo_reward_full)", HOLDS,
       "needs pi_ref(y|x) > 0", "07 §2", "sympy"),
    _c("C08", [(CH, "This is the loss function for DPO")],
       "Z(x) cancels in the Bradley-Terry probability; the sigmoid form (eq:dpo_loss_deriv0 to 3)", HOLDS,
       "the last step is a probability; the loss is its negative log-likelihood with pi* -> pi_theta", "07 §2",
       "sympy"),
    _c("C09", [(CH, "the gradient solves the above objective")], "The gradient and its weight sigma(r_hat_l - r_hat_w) (eq:dpo_grad_3)", HOLDS,
       "matches autograd on the course's GPT-2", "07 §3", "sympy + autograd"),
    _c("C10", [(CH, "a weight of the parameter update from 0 to 1 that is higher when the reward estimate is incorrect")],
       "The weight lies in (0, 1) and is larger when the implicit reward mis-ranks the pair", HOLDS,
       "sigma(r_hat_l - r_hat_w) > 1/2 exactly when the pair is mis-ranked", "07 §3", "torch"),
    _c("C11", [(CH, "the terms in the inner brackets $[\\cdot]$ increases the likelihood of the chosen response")],
       "The gradient's bracketed terms raise the chosen likelihood and lower the rejected one", ONLY_IF,
       "read term by term: each term alone does; their sum always widens the margin, yet lowers log pi(y_chosen) "
       "for some pairs already at the first step on the GPT-2 world (shared parameters)", "07 §3; 04",
       "autograd on the GPT-2 world"),
    _c("C12", [(TUT, "increases divergence from the reference"), (ENC, "KL constraint is tight")],
       "Which way beta pushes: the tutorial says a higher beta moves the policy further from the reference",
       WRONG, "the tutorial has beta reversed (the encyclopedia and the glossary are right): KL(pi* || pi_ref) "
       "falls monotonically as beta grows", "07 §1.1; 05 (beta sweep)", "exact world"),
    _c("C13", [(ENC, "the gradient of $L_{\\text{DPO}}$ vanishes and the policy does not move")],
       "As beta -> infinity the gradient vanishes and the policy does not move", WRONG,
       "at pi_ref, where training starts, the gradient grows like beta; what tends to pi_ref is the optimum "
       "(h* = logit(p)/beta -> 0). The gradient vanishes only late, once every pair's margin is positive",
       "07 §4; 05", "sympy + exact world"),
    _c("C14", [(ENC, "collapse onto the single highest-probability continuation")],
       "As beta -> 0 the policy collapses on the most probable continuation, ignoring pi_ref", ONLY_IF,
       "onto the highest-REWARD response within the support of pi_ref: pi_ref still fixes the support",
       "07 §4", "exact world"),
    _c("C15", [(ENC, "Mode collapse at high")], "Mode collapse at high beta", WRONG,
       "a high beta keeps pi_ref's diversity; loss of diversity comes at small beta", "07 §1.1", "exact world"),
    _c("C16", [(CH, "the KL distance is set explicitly by the")], "beta sets the KL distance", WRONG,
       "beta is a penalty weight, not a budget: the KL depends on the reward scale, the data and the steps, and "
       "grows without bound under deterministic labels", "07 §4", "exact world"),
    _c("C17", [(CH, "cDPO assumes N percent of the data is incorrectly labelled")],
       "cDPO assumes a fraction of flipped labels", HOLDS,
       "its per-pair optimum is the finite margin log((1-eps)/eps)/beta; but with eps equal to the true flip "
       "rate it does NOT undo the flips: it shrinks the learned reward a second time (06c §2, exact world over 10 "
       "seeds); robust DPO is the unbiased one. Cite Mitchell 2023",
       "07 §5; 06c", "sympy + exact world"),
    _c("C18", [(CH, "moving away from the Bradley-Terry assumption, with $\\Psi(q) = \\log")],
       "IPO uses Psi(q) = log(q/(1-q))", WRONG,
       "Psi = logit is the choice that gives back RLHF and DPO; IPO is Psi = identity (a bounded target)",
       "07 §1.3", "sympy + exact world"),
    _c("C19", [(ENC, "avoid the problematic regime where $\\sigma(\\cdot) \\to 1$")], "The IPO loss (h - 1/(2 beta))^2 avoids the regime where the gradient vanishes",
       ONLY_IF, "the formula is right; the motivation is DPO's infinite optimum under deterministic labels",
       "07 §1.3; 06c §5", "torch + sympy"),
    _c("C20", [(GLO, "IPO (Identity Policy Optimization): A variant that adds a regularization term")],
       "IPO is 'Identity Policy Optimization' and adds a regularisation term", WRONG,
       "Identity PREFERENCE Optimisation; it replaces the logistic loss by a squared one", "07 §1.3", "citation"),
    _c("C21", [(CH, "with a small penalty on the chosen response")], "ORPO puts a small penalty on the chosen",
       WRONG, "ORPO = NLL on the chosen + an odds-ratio penalty on the REJECTED (Hong et al. 2024)", "07 §1.7",
       "autograd"),
    _c("C22", [(ENC, "SimPO (Simple Preference Optimisation")],
       "SimPO: averaged log-probs, no reference, no length bias", ONLY_IF,
       "SimPO = length-averaged reward AND no reference AND a target margin; length bias is not removed: it "
       "follows a length-loving labeller to 20-word run-on answers, KL up to 38, in every seed (06b)",
       "07 §5; 06b", "torch + GPT-2 world over seeds"),
    _c("C23", [(ENC, "uses unpaired preference data")], "The KTO loss as the encyclopedia writes it", WRONG,
       "signs swapped (minimising it lowers desirable outputs) and beta applied twice; KTO is lambda_y - v",
       "07 §1.7", "autograd"),
    _c("C24", [(TUT, "as the sum (or mean) of token log-probabilities")],
       "Sum or mean of token log-probs (the tutorial: either)", ONLY_IF,
       "the sum: the derivation needs log pi(y|x) = sum_t log pi(y_t|...); the mean is another objective",
       "07 §1.4", "exact world with lengths"),
    _c("C25", [(CH, "preference displacement")], "Chosen and rejected log-probs both fall (displacement)",
       ONLY_IF, "a frequent tendency of networks with shared parameters (04: all 5 seeds on GPT-2), not a law: "
       "a tabular policy raises the chosen", "07 §3; 04", "torch + GPT-2 world over seeds"),
    _c("C26", [(WEB, "this preference displacement does not occur"),
               (CH, "mitigate this **preference displacement**")],
       "Cal-DPO 'mitigates' displacement (markdown) / makes it 'not occur' (web edition)", ONLY_IF,
       "the mass goes to responses outside the data (squeezing); 'mitigate' is defensible, 'does not occur' "
       "is overstated", "07 §1.6", "torch"),
    _c("C27", [(ENC, "derives an exact equivalence")], "DPO is exactly equivalent to RLHF", ONLY_IF,
       "Bradley-Terry preferences, full coverage, a realisable policy class, enough data: equivalence of "
       "POPULATION optima", "07 §6", "exact world"),
    _c("C28", [(ENC, "No reward model, no sampling, no advantage estimation"),
               (GLO, "bypassing the need to train a separate reward model")],
       "DPO needs no reward model (encyclopedia, tutorial, glossary) vs 'a reward model at its core' (chapter)",
       ONLY_IF, "no SEPARATE reward network; DPO fits a Bradley-Terry reward model parametrised by the policy "
       "(the chapter is right)", "07 §1.2", "torch + exact world"),
    _c("C29", [(GLO, "complex and unstable intermediate step")],
       "Reward modelling is the unstable step; DPO's closed form comes from it", WRONG,
       "reward modelling is the loss DPO itself minimises; RLHF's instability is in the RL stage; pi* comes "
       "from the RL objective", "07 §1.2", "exact world + reasoning"),
    _c("C30", [(GLO, "inherently less susceptible to this failure mode")],
       "DPO is inherently less susceptible to reward hacking (no explicit reward model to hack)", WRONG,
       "DPO optimises an implicit reward fitted on the same finite labels, a proxy like any learned reward: on "
       "96 labels it spends pi*'s KL for well under pi*'s gain in every seed (sub-optimality). Over-"
       "optimisation proper, true reward falling as KL grows, is shown for direct alignment by Rafailov et al. "
       "2024 (arXiv:2406.02900) and measured on a gold reward in notebook 08", "07 §6; 08",
       "exact world over seeds + citation"),
    _c("C31", [(ENC, "Reference policy collapse")],
       "If pi_ref gives a preferred response near-zero probability, the implicit reward is dominated by pi_ref",
       ONLY_IF, "the implicit reward's differences still recover the reward at the optimum when such pairs are "
       "in the data (checked); what a tiny pi_ref(y_w) limits is the policy's mass on y_w "
       "(pi* = pi_ref e^{r/beta}/Z) and, with pairs sampled from pi_ref, how often y_w is seen at all",
       "07 §6", "exact world"),
    _c("C32", [(ENC, "if it is not increasing during training, the reference policy is mismatched")],
       "A margin that does not increase during training means the reference is mismatched", WRONG,
       "a flat margin has other causes (labels the model cannot fit, e.g. noise with shared parameters), and a "
       "mismatched reference does not flatten the training margin; the margin is a diagnostic only on "
       "held-out pairs", "07 §6", "exact world"),
    _c("C33", [(ENC, "matches or exceeds PPO"), (ENC, "Training time dropped by approximately")],
       "On Anthropic HH, DPO matches or exceeds PPO, about 3x faster", WRONG,
       "the DPO paper has no controlled PPO comparison on HH (Best-of-128 stood in) and no '3x'; the PPO "
       "comparisons are IMDb sentiment and TL;DR", "07 §6", "citation"),
    _c("C34", [(TUT, "computationally lighter")], "DPO is lighter, more stable, more data-efficient than PPO",
       ONLY_IF, "per step, cheaper (no sampling, reward model or value network; measured); 'more stable' and "
       "'more data-efficient' are not established (notebook 08 compares online methods)", "07 §6; 08",
       "measurement + citation"),
    _c("C35", [(TUT, "in a **single forward pass**")], "DPO trains in a single forward pass", WRONG,
       "a step needs a policy forward, a reference forward (or a cache) and a backward, over many steps; it "
       "means 'no sampling loop'", "07 §6", "forward hooks"),
    _c("C36", [(TUT, "loss = -torch.logsigmoid(logits).mean()"),
               (TUT, "loss = -torch.log(torch.sigmoid(logits)).mean()")],
       "The tutorial's best practices and its code", WRONG,
       "the advice holds, the code does not: torch.logsigmoid does not exist, log(sigmoid) gives inf/NaN, the "
       "reference runs with autograd", "07 §7", "torch"),
    _c("C37", [(CH, "logits = pi_logratios - ref_logratios")], "The chapter's original preference_loss snippet", HOLDS,
       "the plain-DPO subset of the original trainer", "07 §5", "torch"),
    _c("C38", [(CH, "reducing the peak memory usage by 50%")], "Caching reference log-probs halves peak memory",
       WRONG, "far less with a no_grad reference (measured); about half only against a reference that keeps "
       "autograd", "07 §1.5", "measured"),
    _c("C39", [(CH, "this doubles the memory used and results in increased GPU usage")],
       "A live reference costs compute", HOLDS, "a reference forward is about 1/4 of a step's FLOPs; measured",
       "07 §1.5", "FLOPs + measured"),
    _c("C40", [(CH, "kickstarting it in October of 2023"), (WEB, "kickstarting it in October of 2024")],
       "Dates: SLiC-HF before DPO; Zephyr-beta in October 2023 (markdown) / 2024 (web edition)", WRONG,
       "the web edition's 2024 is wrong: Zephyr is arXiv:2310.16944, October 2023; the markdown is right",
       "07 §1.6", "citation"),
    _c("C41", [(GLO, "foundational technique in Constitutional AI frameworks")],
       "DPO is foundational in Constitutional AI", WRONG,
       "Constitutional AI (arXiv:2212.08073, Dec 2022) optimises a preference model with PPO and predates DPO",
       "07 §8", "citation"),
    _c("C42", [(GLO, "special case of more general contrastive loss frameworks")],
       "DPO is a special case of contrastive losses", HOLDS,
       "DPO, IPO and SLiC are f(h) for convex f of the same margin (PsiPO, GPO)", "07 §5", "torch"),
    # ---- added with issue 10: statements the earlier table left out or folded into another record
    _c("C43", [(GLO, "increase the log-likelihood of the preferred completion")],
       "DPO trains the policy to increase the log-likelihood of the preferred completion and decrease it for "
       "the dispreferred one", WRONG,
       "it widens the margin between the two (relative to pi_ref); the preferred completion's log-likelihood "
       "itself FALLS on the GPT-2 world in every seed (preference displacement, 04 and 06)", "04; 06 §5; 07 §3",
       "GPT-2 world over seeds"),
    _c("C44", [(GLO, "mitigates issues like reward hacking and distributional shift")],
       "DPO mitigates distributional shift", WRONG,
       "DPO learns from fixed samples of pi_ref; the policy it yields generates outside that data and gets no "
       "signal there: on the GPT-2 world the samples of every objective leave the grammar more often than "
       "pi_ref's (95% grammatical) in every one of 5 seeds (ORPO only just), DPO's down to 18% in the seed that runs away (06 §5); online "
       "methods sample from the policy instead (08)", "06 §5; 08", "GPT-2 world over seeds"),
    _c("C45", [(CH, "lower ceiling on performance than online")],
       "Offline DPO has a lower ceiling than online (RL-based) RLHF because its signal comes from other "
       "models' completions", ONLY_IF,
       "not reproduced on the course's world: at equal KL, RLOO with the true reward (PPO-GT's role) and with a "
       "learned reward is within DPO's seed-to-seed spread, each ahead in some seeds; the best gold reward any "
       "checkpoint reached is no higher for RLOO than for DPO; and best-of-n from pi_ref beats all of them. "
       "The claim may hold where the policy must go far beyond pi_ref's samples, which this world does not need",
       "08 §3, §4", "GPT-2 world over seeds"),
    _c("C46", [(CH, "alleviate these by generating new completions")],
       "Online variants (Online DPO, D2PO) alleviate this by generating new completions during training",
       ONLY_IF,
       "not reproduced on the course's world: online DPO (same labeller, same beta, pairs sampled from the current "
       "policy) is not ahead of offline DPO at equal KL: its median true reward is lower (0.14 against 0.71 at "
       "KL 1, ahead in 2 of 5 seeds) and its samples leave the grammar as DPO's do (82% against 79% grammatical "
       "at KL 1)",
       "08 §3", "GPT-2 world over seeds"),
    _c("C47", [(CH, "the choice of algorithm is far less important than the initial model and the data used")],
       "The choice of algorithm matters far less than the initial model and the data", ONLY_IF,
       "within one family of objectives: one model here, so only the data side is tested. Within the DPO "
       "family no order among DPO, cDPO and IPO at matched KL holds across 5 seeds, while one data order in five "
       "sends DPO to KL 29 and a length-loving labeller lengthens its answers by 5.7 words. Across families the "
       "algorithm matters: the hinge, KTO and APO-zero buy about half of DPO's reward at matched KL in every "
       "seed, and ORPO follows the labeller less (3.2 words) than objectives differ under one labeller (5.2)",
       "06 §5; 06b",
       "GPT-2 world over seeds"),
    _c("C48", [(CH, "DPO treats every pair of preference data with equal weight")],
       "DPO treats every pair with equal weight", ONLY_IF,
       "every pair carries the same binary label whatever the size of the preference (the loss cannot see the "
       "reward gap); the gradient does weight pairs unequally, by sigma(-beta h)", "07 §5", "torch"),
    _c("C49", [(CH, "surprisingly low learning rates")], "DPO needs surprisingly low learning rates", HOLDS,
       "citation: Zephyr-beta used 5e-7 for DPO against 2e-5 for its SFT (Tunstall et al. 2023, "
       "arXiv:2310.16944); the course's tiny model trains at 5e-4 to 1e-3, and 06 shows 1e-3 already "
       "over-optimises it", "07 §6; 06 §3", "citation"),
    _c("C50", [(TUT, "Human Noise Amplification")],
       "Inconsistent or biased human feedback is amplified by DPO", ONLY_IF,
       "biased feedback is reproduced as if it were the reward, by every objective in every seed (06b, a "
       "length-loving labeller); random label flips are damped, not amplified: DPO's optimum under flips is pi* "
       "of a SHRUNK reward, so it moves less (06c §2, exact world over 10 seeds), and on GPT-2 flips at 0.2 cost "
       "every objective reward in every one of 5 seeds", "06b; 06c", "exact world + GPT-2 world over seeds"),
)

_BY_ID = {c.id: c for c in CLAIMS}
assert len(_BY_ID) == len(CLAIMS), "duplicate claim ids"


def get(claim_id: str) -> Claim:
    """The record of ``claim_id`` ("C11"); ValueError naming the known ids if there is none."""
    try:
        return _BY_ID[claim_id]
    except KeyError:
        raise ValueError(f"no claim {claim_id!r}; known: {', '.join(_BY_ID)}") from None


def counts(records=CLAIMS) -> dict[str, int]:
    """How many records have each verdict (PENDING included)."""
    return {v: sum(c.verdict == v for c in records) for v in (*VERDICTS, PENDING)}


def summary_table(records=CLAIMS, columns=("id", "source", "claim", "verdict", "correction", "evidence")) -> str:
    """The verdicts as a markdown table (notebook 07 displays it; the README links it)."""
    def cell(c: Claim, col: str) -> str:
        if col == "source":
            return "; ".join(SHORT[k] for k in c.sources)
        if col == "verdict":
            return f"**{c.verdict}**"
        if col == "quote":
            return " / ".join(f"“{q}”" for _, q in c.quotes)
        return str(getattr(c, col)).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, col) for col in columns) + " |" for c in records]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the source texts

def source_texts_dir() -> Path | None:
    """Where the source texts are, if anywhere: $MINIDPO_SOURCE_TEXTS, else ``shared/seeds`` beside the repo."""
    env = os.environ.get("MINIDPO_SOURCE_TEXTS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "seeds")
    return next((p for p in candidates if p.is_dir()), None)


def normalise(text: str) -> str:
    """Text for comparing quotes: markdown emphasis and code marks dropped, non-ASCII dropped (the stored texts
    carry mis-decoded punctuation), whitespace collapsed, lower case."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"[*_`]", "", text)
    text = text.encode("ascii", "ignore").decode()
    return re.sub(r"\s+", " ", text).strip().lower()


_TEXTS: dict[str, str] | None = None


def _texts() -> dict[str, str]:
    global _TEXTS
    if _TEXTS is None:
        folder = source_texts_dir()
        _TEXTS = {}
        if folder is not None:
            for key, prefix in _TEXT_PREFIX.items():
                found = sorted(folder.glob(f"{prefix}_*"))
                if found:
                    _TEXTS[key] = normalise(found[0].read_text(encoding="utf-8", errors="replace"))
    return _TEXTS


NOT_CHECKED = "not checked here"
QUOTE_LOG: list[tuple[str, str, str]] = []  # (source, fragment, "found" | NOT_CHECKED), in the order asked


def quoted(source: str, *fragments: str) -> str:
    """Check that each fragment is in the text of ``source`` (a key of ``SOURCES``).

    Returns "found" or, where the texts are not on this machine, "not checked here" (also logged in
    ``QUOTE_LOG``, so a notebook can say how many quotes it could not check). Raises ValueError for a fragment
    that is not in the text, or for an unknown source.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if not fragments:
        raise ValueError("quoted: give at least one fragment")
    texts = _texts()
    status = "found" if source in texts else NOT_CHECKED
    for fragment in fragments:
        if status == "found" and normalise(fragment) not in texts[source]:
            raise ValueError(f"quote not found in the {source}: {fragment!r}")
        QUOTE_LOG.append((source, fragment, status))
    return status


def check_record(claim: Claim) -> str:
    """``quoted`` for every quote of a record; "found" or "not checked here"."""
    statuses = {quoted(key, text) for key, text in claim.quotes}
    return NOT_CHECKED if NOT_CHECKED in statuses else "found"


__all__ = ["HOLDS", "ONLY_IF", "WRONG", "PENDING", "VERDICTS", "SOURCES", "Claim", "CLAIMS", "get", "counts",
           "summary_table", "source_texts_dir", "normalise", "quoted", "check_record", "QUOTE_LOG", "NOT_CHECKED"]
