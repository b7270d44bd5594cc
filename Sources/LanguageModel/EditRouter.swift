import Foundation
import TensorCore

/// Where in a block the router reads the stream: the normalised input of the attention or of the MLP.
public enum RouteSite: Int, Sendable, CaseIterable {
    case attentionInput = 0
    case mlpInput = 1
}

/// A position's closest key within its threshold: the key's shard and the cosine (`none`: no key).
public struct RouteHit: Sendable, Equatable {
    public var shard: Int32
    public var cosine: Float
    public static let none = RouteHit(shard: -1, cosine: -.infinity)

    /// A sequence's route after a position with `hit`: the closer of the two keys (the earlier on a tie).
    func continued(by hit: RouteHit) -> RouteHit { hit.shard >= 0 && hit.cosine > cosine ? hit : self }
}

/// Decides which positions see a model's edits, as GRACE and WISE route inputs to an edited memory
/// only when they come close to an edit's key: a position whose stream at block `layer`'s `site` lies
/// within cosine `threshold` of one of `keys` (after whitening) switches the edits on for itself and for
/// every later position of its sequence; positions before it, and sequences with no such position, run
/// as the unedited model.
///
/// `whitening` [C, C] maps a stream row to the space where keys are compared (the preserved inputs'
/// second moment to the power −½, so that directions every text shares count for little); `keys` [K, C]
/// are already whitened and of unit length. Each key keeps the threshold it was added with
/// (`keyThresholds`): a state continued by an editor with another threshold routes its earlier edits as
/// before and applies the new threshold to the keys it adds.
///
/// With shards (`ls_shard_edits`), each key names the shard its edit was solved in (`keyShards`), and a
/// routed position sees the shard of the closest key its sequence has matched so far.
public final class EditRouter: @unchecked Sendable {
    public let layer: Int
    public let site: RouteSite
    /// The threshold of the keys added last (and of keys added without one).
    public let threshold: Float
    public let whitening: Tensor
    public let keys: Tensor
    /// Per key, its cosine threshold [K].
    public let keyThresholds: [Float]
    /// Per key, the shard of its edit [K] (all 0 without shards).
    public let keyShards: [Int32]
    /// One more than the largest shard of a key (1 without keys).
    public let shardCount: Int
    /// With shards: per key, the place of its edit in the state's sequence of edits [K] (what a superseding
    /// edit finds its predecessor's keys by).
    public let keyEdits: [Int32]?

    /// `keyThresholds`, `keyShards`, `keyEdits`: one per key; nil gives every key `threshold`, shard 0, and
    /// no edit.
    public init(layer: Int, site: RouteSite, threshold: Float, whitening: Tensor, keys: Tensor, keyThresholds: [Float]? = nil,
                keyShards: [Int32]? = nil, keyEdits: [Int32]? = nil) {
        precondition(whitening.rank == 2 && whitening.shape[0] == whitening.shape[1], "whitening must be square")
        precondition(keys.rank == 2 && keys.shape[1] == whitening.shape[0], "keys \(keys.shape) for whitening \(whitening.shape)")
        precondition(keyThresholds.map { $0.count == keys.shape[0] } ?? true, "one threshold per key")
        precondition(keyShards.map { $0.count == keys.shape[0] && $0.allSatisfy { $0 >= 0 } } ?? true, "one shard ≥ 0 per key")
        precondition(keyEdits.map { $0.count == keys.shape[0] } ?? true, "one edit per key")
        self.layer = layer; self.site = site; self.threshold = threshold; self.whitening = whitening; self.keys = keys
        self.keyThresholds = keyThresholds ?? [Float](repeating: threshold, count: keys.shape[0])
        self.keyShards = keyShards ?? [Int32](repeating: 0, count: keys.shape[0])
        shardCount = Int(self.keyShards.max() ?? 0) + 1
        self.keyEdits = keyEdits
    }

    public var width: Int { whitening.shape[0] }

    /// `x` [N, C] whitened, each row scaled to unit length (a zero row stays zero).
    public static func project(_ x: UnsafePointer<Float>, N: Int, whitening: Tensor) -> Tensor {
        let C = whitening.shape[0]
        let out = Tensor(shape: [N, C])
        guard N > 0 else { return out }
        BLAS.gemm(out.data, x, whitening.data, M: N, N: C, K: C)
        for n in 0..<N {
            let row = out.data + n * C
            var s: Float = 0
            for i in 0..<C { s += row[i] * row[i] }
            if s > 0 { BLAS.scal(row, count: C, alpha: 1 / s.squareRoot()) }
        }
        return out
    }

    /// Whether each of the `N` rows of `x` [N, C] is within some key's threshold of that key.
    public func matches(_ x: UnsafePointer<Float>, N: Int) -> [Bool] { closest(x, N: N).map { $0.shard >= 0 } }

    /// For each of the `N` rows of `x` [N, C], the closest key among those it is within the threshold of
    /// (the first such key on a tie), or `none`.
    public func closest(_ x: UnsafePointer<Float>, N: Int) -> [RouteHit] {
        let K = keys.shape[0], C = width
        var hit = [RouteHit](repeating: .none, count: N)
        guard K > 0, N > 0 else { return hit }
        let q = Self.project(x, N: N, whitening: whitening)
        let chunk = max(1, (1 << 20) / K)   // at most a million similarities at a time
        var start = 0
        while start < N {
            let n = min(chunk, N - start)
            let s = Tensor(shape: [n, K])
            BLAS.gemm(s.data, q.data + start * C, keys.data, M: n, N: K, K: C, transB: true)
            keyThresholds.withUnsafeBufferPointer { th in
                for i in 0..<n {
                    let row = s.data + i * K
                    var best = RouteHit.none
                    for k in 0..<K where row[k] >= th[k] && row[k] > best.cosine { best = RouteHit(shard: keyShards[k], cosine: row[k]) }
                    hit[start + i] = best
                }
            }
            start += n
        }
        return hit
    }

    /// The whitening for preserved inputs with second moment `secondMoment` [C, C]: (M + εI)^−½ with ε a
    /// thousandth of M's mean eigenvalue (so that directions the texts never use do not blow up).
    public static func whitening(secondMoment m: Tensor) throws -> Tensor {
        let C = m.shape[0]
        var a = [Double](repeating: 0, count: C * C)
        var trace = 0.0
        for i in 0..<C * C { a[i] = Double(m[i]) }
        for i in 0..<C { trace += a[i * C + i] }
        let eps = max(1e-3 * trace / Double(C), 1e-12)
        for i in 0..<C { a[i * C + i] += eps }
        let (values, vectors) = try LinearAlgebra.symmetricEigen(a, n: C)
        // V·diag(λ^−½)·Vᵀ: the eigenvectors' columns scaled, times Vᵀ.
        let v = Tensor(shape: [C, C]), scaled = Tensor(shape: [C, C])
        for i in 0..<C {
            for k in 0..<C {
                v[i * C + k] = Float(vectors[i * C + k])
                scaled[i * C + k] = Float(vectors[i * C + k] / max(values[k], eps).squareRoot())
            }
        }
        let out = Tensor(shape: [C, C])
        BLAS.gemm(out.data, scaled.data, v.data, M: C, N: C, K: C, transB: true)
        return out
    }
}
