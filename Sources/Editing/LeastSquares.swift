import Foundation
import LanguageModel
import Storage
import TensorCore
import Tokenizers

/// The `least_squares` accumulation rule for one module: the normal equations
/// `(λ·C + Σ uuᵀ) · ΔW = Σ u·vᵀ`, where `u` are the input rows of the edits' gradient signals, `v` the
/// value rows the network asks of the module there (`lr·x2`), and `C` the second moment `E[uuᵀ]` of the
/// module's inputs on preserved text. ΔW maps every edit's inputs to its values as well as the module's
/// capacity allows while leaving inputs like the preserved ones (large in `C`) where they were.
public enum LeastSquares {
    /// The key statistics of `modules` as stored in an editor folder or a meta-training checkpoint
    /// (`key_stats.<module>`).
    public static func readKeyStatistics(_ source: TensorSource, modules: [String]) throws -> [String: Tensor] {
        Dictionary(uniqueKeysWithValues: try modules.map { ($0, try source.tensor("key_stats." + $0)) })
    }

    /// Adds the key statistics to a safetensors file being written, under the names `readKeyStatistics` reads.
    public static func writeKeyStatistics(_ stats: [String: Tensor], to writer: inout SafetensorsWriter) throws {
        for (name, t) in keyStatisticsTensors(stats) { try writer.add(name, t) }
    }

    /// The stored names and tensors of the key statistics, by module name.
    public static func keyStatisticsTensors(_ stats: [String: Tensor]) -> [(String, Tensor)] {
        stats.keys.sorted().map { ("key_stats." + $0, stats[$0]!) }
    }

    /// The facts a pool of edits states as true (prompt + ground truth, each rephrasing + ground truth, each
    /// neighbour + its answer): what the model knows and edits must leave alone. The texts of the preserved
    /// keys' statistics when no other text is given.
    public static func preservedTexts(_ pool: [EditRequest]) -> [String] {
        var out: [String] = []
        var seen = Set<String>()
        func add(_ s: String) { if seen.insert(s).inserted { out.append(s) } }
        for r in pool {
            if let gt = r.groundTruth {
                add(r.prompt + " " + gt)
                for p in r.rephrases { add(p + " " + gt) }
            }
            for l in r.locality { add(l.prompt + " " + l.groundTruth) }
        }
        return out
    }

    /// Σ uᵀu over rows: [in, in] (added to `into` when given), scaled by `alpha`; exactly symmetric (its upper
    /// triangle computed and mirrored), so that a stored state keeps only that triangle.
    public static func gram(_ u: Tensor, alpha: Float = 1, into: Tensor? = nil) -> Tensor {
        let n = u.shape[1], L = u.shape[0]
        let out = into ?? Tensor(shape: [n, n])
        BLAS.syrk(out.data, u.data, N: n, K: L, alpha: alpha, beta: into == nil ? 0 : 1)
        return out
    }

    /// A symmetric [n, n] matrix as its upper triangle, row by row ([n(n+1)/2]); nil when it is not exactly
    /// symmetric (a state made before the grams were).
    public static func packedUpper(_ g: Tensor) -> Tensor? {
        guard g.shape.count == 2, g.shape[0] == g.shape[1] else { return nil }
        let n = g.shape[0], p = g.data
        let tile = 64
        for ib in stride(from: 0, to: n, by: tile) {
            for jb in stride(from: 0, through: ib, by: tile) {
                for i in ib..<min(ib + tile, n) { for j in jb..<min(jb + tile, i) where p[i * n + j] != p[j * n + i] { return nil } }
            }
        }
        let out = Tensor(shape: [n * (n + 1) / 2])
        var k = 0
        for i in 0..<n {
            (out.data + k).update(from: p + i * n + i, count: n - i)
            k += n - i
        }
        return out
    }

    /// The symmetric [n, n] matrix of a `packedUpper` triangle; nil when the length is no n(n+1)/2.
    public static func unpackedUpper(_ t: Tensor) -> Tensor? {
        guard t.shape.count == 1 else { return nil }
        let n = Int((Double(8 * t.count + 1).squareRoot() - 1) / 2)
        guard n * (n + 1) / 2 == t.count else { return nil }
        let out = Tensor(uninitializedShape: [n, n])
        let o = out.data, p = t.data
        var k = 0
        for i in 0..<n {
            for j in i..<n { o[i * n + j] = p[k]; o[j * n + i] = p[k]; k += 1 }
        }
        return out
    }

    /// Σ uᵀv over rows: [in, out] (added to `into` when given), scaled by `alpha`.
    public static func cross(_ u: Tensor, _ v: Tensor, alpha: Float = 1, into: Tensor? = nil) -> Tensor {
        let n = u.shape[1], m = v.shape[1], L = u.shape[0]
        let out = into ?? Tensor(shape: [n, m])
        BLAS.gemm(out.data, u.data, v.data, M: n, N: m, K: L, transA: true, alpha: alpha, beta: into == nil ? 0 : 1)
        return out
    }

    /// Mantissa bits a frozen shard's ΔW keeps (float16's 10; the exponent stays float32's).
    public static let frozenMantissaBits = 10

    /// `t` with every value rounded to `frozenMantissaBits` mantissa bits (to nearest, ties to even), in
    /// place: what a frozen shard's ΔW holds, in memory as in the store. Its 13 low bits are then zero, which
    /// the store's byte-shuffled zstd keeps almost for free: a shard stores in about half its float32 bytes,
    /// for a relative change of at most 2⁻¹¹ per value.
    @discardableResult
    public static func roundedForStorage(_ t: Tensor) -> Tensor {
        let drop = UInt32(23 - frozenMantissaBits)
        let half = UInt32(1) << (drop - 1), mask = ~((UInt32(1) << drop) - 1)
        for i in 0..<t.count {
            let v = t.data[i]
            guard v.isFinite else { continue }
            let b = v.bitPattern
            let odd = (b >> drop) & 1
            // Round to nearest, ties to even; a carry into the exponent is the correct rounding.
            t.data[i] = Float(bitPattern: (b &+ (half - 1) &+ odd) & mask)
        }
        return t
    }

    /// The factor of `λ·C + G`, plus a ridge of 1e-4 of the mean diagonal: `C` from little text is rank-deficient,
    /// and the float32 sums behind both terms carry round-off of about 1e-7 of the largest eigenvalue, which a
    /// rank-deficient sum can turn into a negative one.
    public static func factor(stats: Tensor, lambda: Float, gram: Tensor) throws -> LinearAlgebra.Cholesky {
        let n = stats.shape[0]
        var a = [Double](repeating: 0, count: n * n)
        var trace = 0.0
        for i in 0..<(n * n) { a[i] = Double(lambda) * Double(stats.data[i]) + Double(gram.data[i]) }
        for i in 0..<n { trace += a[i * n + i] }
        let ridge = max(trace / Double(max(n, 1)), 1e-12) * 1e-4
        for i in 0..<n { a[i * n + i] += ridge }
        return try LinearAlgebra.Cholesky(a, n: n)
    }

    /// Second moments `E[uuᵀ]` of the inputs of `modules` over `texts` (each text one sequence, truncated to
    /// the model's positions), on the unedited model. Padding positions are left out.
    public static func keyStatistics(model: TransformerLM, tokenizer: Tokenizer, modules: [String], texts: [String],
                                     batchSize: Int = 32, progress: (Int, Int) -> Void = { _, _ in })
        -> (stats: [String: Tensor], tokens: Int) {
        var sums: [String: Tensor] = [:]
        for m in modules {
            let n = model.linears[m]!.inFeatures
            sums[m] = Tensor(shape: [n, n])
        }
        var tokens = 0
        let seqs = texts.map { Array(tokenizer.encode($0).prefix(model.spec.maxPositions)) }.filter { !$0.isEmpty }
        forEachInputRows(model: model, sequences: seqs, modules: modules, batchSize: batchSize) { rows, done in
            for m in modules { _ = gram(rows[m]!, into: sums[m]!) }
            tokens += rows[modules[0]]!.shape[0]
            progress(done, seqs.count)
        }
        for m in modules { sums[m]!.scale(1 / Float(max(tokens, 1))) }
        return (sums, tokens)
    }

    /// The input rows of `modules` at every real token of `sequences` on the unedited model, a batch of
    /// sequences at a time: `body` gets per module the rows [tokens of the batch, in] and the sequences done.
    static func forEachInputRows(model: TransformerLM, sequences seqs: [[Int]], modules: [String], batchSize: Int,
                                 _ body: ([String: Tensor], Int) -> Void) {
        guard !modules.isEmpty else { return }
        model.withoutEdits {
            var start = 0
            while start < seqs.count {
                let chunk = Array(seqs[start..<min(start + batchSize, seqs.count)])
                let batch = TokenBatch(rightPadded: chunk)
                model.forward(batch)
                var rows: [Int] = []
                for (b, s) in chunk.enumerated() { for t in 0..<s.count { rows.append(b * batch.T + t) } }
                var out: [String: Tensor] = [:]
                for m in modules {
                    let inp = model.lastInput(of: m)!
                    let n = inp.shape[1]
                    let u = Tensor(shape: [rows.count, n])
                    for (i, r) in rows.enumerated() { (u.data + i * n).update(from: inp.data + r * n, count: n) }
                    out[m] = u
                }
                start += chunk.count
                body(out, start)
            }
        }
    }
}
