import Foundation

/// Refuses a batch whose edits would break the model (Yang et al., arXiv 2402.09656): held-out
/// perplexity far above the unedited model's, unrelated canary facts changing, or earlier edits
/// forgotten. A refused batch goes to `failed/` with its evaluation; HEAD stays where it was.
public struct CollapseGuard: Codable, Sendable, Equatable {
    public var enabled = true
    /// Largest accepted held-out perplexity after the batch, as a multiple of the unedited model's.
    public var maxPerplexityRatio = 1.5
    /// Smallest accepted locality on the canary facts (share of their answer tokens the edited model
    /// predicts as the unedited model does).
    public var minCanaryLocality = 0.5
    /// Smallest accepted retention (reliability on a sample of earlier batches' edits) after the batch.
    /// 0.5 by default: the shipped `least_squares` editor keeps its edits (0.98–1.0 of them after 100,
    /// 0.66 after 1,000), so falling under half means the batch overwrote earlier ones. (The paper's
    /// `decayed` rule forgets by design: set 0 for it.)
    public var minRetention = 0.5
    /// Smallest accepted reliability of the batch's own edits: 0.5 by default, since the shipped editor
    /// takes 0.98–1.0 of a batch's edits at up to 100 earlier ones; a batch where most edits did not
    /// take is a failure to look at, not a version to commit silently.
    public var minReliability = 0.5

    public init() {}

    public static let disabled: CollapseGuard = { var g = CollapseGuard(); g.enabled = false; return g }()

    enum CodingKeys: String, CodingKey {
        case enabled, maxPerplexityRatio = "max_perplexity_ratio", minCanaryLocality = "min_canary_locality"
        case minRetention = "min_retention", minReliability = "min_reliability"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = CollapseGuard()
        enabled = try c.decodeIfPresent(Bool.self, forKey: .enabled) ?? d.enabled
        maxPerplexityRatio = try c.decodeIfPresent(Double.self, forKey: .maxPerplexityRatio) ?? d.maxPerplexityRatio
        minCanaryLocality = try c.decodeIfPresent(Double.self, forKey: .minCanaryLocality) ?? d.minCanaryLocality
        minRetention = try c.decodeIfPresent(Double.self, forKey: .minRetention) ?? d.minRetention
        minReliability = try c.decodeIfPresent(Double.self, forKey: .minReliability) ?? d.minReliability
    }

    /// Checks the measurements of one batch.
    public func check(reliability: Double?, perplexity: PerplexityResult?, canary: CanaryResult, retention: RetentionResult?) -> GuardResult {
        var violations: [String] = []
        var notes: [String] = []
        if let r = reliability, !(r >= minReliability) {
            violations.append(String(format: "the batch's reliability %.3f is below the floor %.3f (its edits did not take)", r, minReliability))
        }
        if let p = perplexity {
            let r = p.ratioToUnedited
            if !(r <= maxPerplexityRatio) {
                violations.append(String(format: "perplexity %.3f is %.3f× the unedited model's %.3f (limit %.3f×)",
                                         p.after, r, p.unedited, maxPerplexityRatio))
            }
        } else {
            notes.append("perplexity check skipped: no held-out text")
        }
        if let loc = canary.locality {
            if !(loc >= minCanaryLocality) {
                violations.append(String(format: "canary locality %.3f is below the floor %.3f", loc, minCanaryLocality))
            }
        } else {
            notes.append("canary check skipped: \(canary.skipped ?? "no canary facts")")
        }
        if let ret = retention {
            if !(ret.after >= minRetention) {
                violations.append(String(format: "retention %.3f (on %d earlier edits) is below the floor %.3f", ret.after, ret.sampled, minRetention))
            }
        } else {
            notes.append("retention check skipped: no earlier edits")
        }
        if !enabled {
            return GuardResult(enabled: false, passed: true, settings: self, violations: [], notes: ["the collapse guard is off"] + violations.map { "would refuse: " + $0 })
        }
        return GuardResult(enabled: true, passed: violations.isEmpty, settings: self, violations: violations, notes: notes)
    }
}
