import Foundation
import LanguageModel
import TensorCore
import Tokenizers

/// A state's router as named tensors, so that every path that installs a state (the editor, `generate
/// --store`, `facts --store`) routes its edits the same way: `route.keys` [K, C] (whitened, unit rows),
/// `route.whitening` [C, C], `route.settings` [3] = (block, site, threshold of the keys added last), and
/// `route.thresholds` [K], each key's threshold (absent in states written before it: every key then has
/// the settings' threshold), and with shards (`ls_shard_edits`) `route.shards` [K] and `route.edits` [K], each
/// key's shard and the place of its edit in the sequence of edits (absent: shard 0, no edit).
public enum RouteTensors {
    public static let keys = "route.keys"
    public static let whitening = "route.whitening"
    public static let settings = "route.settings"
    public static let thresholds = "route.thresholds"
    public static let shards = "route.shards"
    public static let edits = "route.edits"
    public static let names: Set = [keys, whitening, settings, thresholds, shards, edits]

    public static func tensors(of router: EditRouter) -> [String: Tensor] {
        var out = [keys: router.keys, whitening: router.whitening,
                   settings: Tensor(shape: [3], values: [Float(router.layer), Float(router.site.rawValue), router.threshold]),
                   thresholds: Tensor(shape: [router.keyThresholds.count], values: router.keyThresholds)]
        if let e = router.keyEdits {
            out[shards] = Tensor(shape: [router.keyShards.count], values: router.keyShards.map(Float.init))
            out[edits] = Tensor(shape: [e.count], values: e.map(Float.init))
        }
        return out
    }

    /// The router the tensors describe (nil when they hold none), or an error naming what is wrong.
    public static func router(from tensors: [String: Tensor]) throws -> EditRouter? {
        let named = [keys, whitening, settings].map { tensors[$0] }
        if named.allSatisfy({ $0 == nil }) { return nil }
        guard let k = named[0], let w = named[1], let s = named[2] else {
            throw EditingError.invalidInput("edit state: a router needs \(keys), \(whitening) and \(settings)")
        }
        guard s.count == 3, let site = RouteSite(rawValue: Int(s[1])), s[0] >= 0, s[0] == s[0].rounded() else {
            throw EditingError.invalidInput("edit state: \(settings) must be [block, site 0|1, threshold]")
        }
        guard w.rank == 2, w.shape[0] == w.shape[1], k.rank == 2, k.shape[1] == w.shape[0] else {
            throw EditingError.shapeMismatch(name: keys, expected: [k.shape.first ?? 0, w.shape.first ?? 0], found: k.shape, file: "edit state")
        }
        var perKey: [Float]?
        if let t = tensors[thresholds] {
            guard t.rank == 1, t.count == k.shape[0] else {
                throw EditingError.shapeMismatch(name: thresholds, expected: [k.shape[0]], found: t.shape, file: "edit state")
            }
            perKey = t.array
            guard perKey!.allSatisfy({ $0.isFinite }) else { throw EditingError.invalidInput("edit state: \(thresholds) must be finite") }
        }
        // Per key: a shard, an edit's place (−1: unknown), both present or both absent.
        func counts(_ name: String, least: Float) throws -> [Int32]? {
            guard let t = tensors[name] else { return nil }
            guard t.rank == 1, t.count == k.shape[0] else {
                throw EditingError.shapeMismatch(name: name, expected: [k.shape[0]], found: t.shape, file: "edit state")
            }
            guard t.array.allSatisfy({ $0 >= least && $0 == $0.rounded() && $0 < 16_777_216 }) else {
                throw EditingError.invalidInput("edit state: \(name) must hold whole numbers ≥ \(Int(least))")
            }
            return t.array.map { Int32($0) }
        }
        let keyShards = try counts(shards, least: 0), keyEdits = try counts(edits, least: -1)
        guard (keyShards == nil) == (keyEdits == nil) else {
            throw EditingError.invalidInput("edit state: \(shards) and \(edits) go together")
        }
        return EditRouter(layer: Int(s[0]), site: site, threshold: s[2], whitening: w.copy(), keys: k.copy(), keyThresholds: perKey,
                          keyShards: keyShards, keyEdits: keyEdits)
    }

    /// Whether the tensors hold a router.
    public static func present(in tensors: [String: Tensor]) -> Bool { tensors[keys] != nil }
}

extension DAFNetEditor {
    /// Where the router reads (`route_threshold`): the input of the lowest edited module in forward order,
    /// which must be an attention or MLP input projection (their input is the block's normalised stream).
    func routeSite() throws -> (module: String, layer: Int, site: RouteSite) {
        let names = model.spec.names
        for l in 0..<model.spec.layers {
            let p = names.layerPrefix(l) + "."
            guard let m = model.spec.linearModules(layer: l).first(where: { config.modules.contains($0) }) else { continue }
            if names.qkv.map({ p + $0 }).contains(m) { return (m, l, .attentionInput) }
            if names.mlpIn.map({ p + $0 }).contains(m) { return (m, l, .mlpInput) }
            throw EditingError.invalidConfig(file: EditorRegistry.configFile, field: "route_threshold",
                                             reason: "the lowest edited module \"\(m)\" does not read the block's stream (route needs an attention or MLP input projection there)")
        }
        throw EditingError.invalidConfig(file: EditorRegistry.configFile, field: "route_threshold", reason: "no edited module")
    }

    /// The whitening of the router's site: from the key statistics of the module that reads it.
    func routeWhitening(module: String) throws -> Tensor {
        guard let stats = keyStatistics[module] else {
            throw EditingError.invalidConfig(file: EditorRegistry.configFile, field: "route_threshold",
                                             reason: "needs the key statistics of \(module) (a least_squares editor has them)")
        }
        do { return try EditRouter.whitening(secondMoment: stats) } catch {
            throw EditingError.invalidInput("route whitening of \(module): \(error)")
        }
    }

    /// The router keys of `requests` (unedited model, whitened unit rows): per edit, the site's stream at the
    /// subject's last token in the prompt, and at the last token of the subject read alone, as a text starts
    /// and with the space it has inside a sentence (the context before a subject moves its stream; these
    /// two carry none); the prompt's last token when the edit names no subject or its prompt lacks it.
    func routeKeys(_ requests: [EditRequest], layer: Int, site: RouteSite, whitening: Tensor) throws -> (keys: Tensor, perEdit: [Int]) {
        var sequences: [[Int]] = [], positions: [Int] = [], perEdit: [Int] = []
        for r in requests {
            let before = sequences.count
            defer { perEdit.append(sequences.count - before) }
            let ids = tokenizer.encode(r.prompt)
            if let s = subjectTokens(r, promptTokens: ids.count) {
                sequences.append(ids); positions.append(s.upperBound - 1)
                for text in [r.subject!, " " + r.subject!] {
                    let alone = tokenizer.encode(text)
                    if !alone.isEmpty { sequences.append(alone); positions.append(alone.count - 1) }
                }
            } else if !ids.isEmpty {
                sequences.append(ids); positions.append(ids.count - 1)
            }
        }
        let raw = try model.siteRows(sequences, at: positions, layer: layer, site: site)
        return (EditRouter.project(raw.data, N: raw.shape[0], whitening: whitening), perEdit)
    }

    /// Where this editor's router reads and its whitening (computed once).
    func routeSetup() throws -> (module: String, layer: Int, site: RouteSite, whitening: Tensor) {
        let (module, layer, site) = try routeSite()
        if routeWhiteningCache == nil { routeWhiteningCache = try routeWhitening(module: module) }
        return (module, layer, site, routeWhiteningCache!)
    }

    /// The state's router grown by the keys of `requests` (a new router on the first routed call): the
    /// earlier keys keep their thresholds, the new ones get `threshold`. With shards (`shards`: per request,
    /// its shard), each key also records its shard and its edit's place (after the state's `editCount`
    /// earlier edits), and the keys of the edits at the places `retired` never match again (a superseded
    /// edit's shard may keep its pull, which no input should reach).
    func grownRouter(_ current: EditRouter?, for requests: [EditRequest], threshold: Float, shards: [Int32]?,
                     editCount: Int, retired: Set<Int>) throws -> EditRouter {
        let setup = try routeSetup()
        let whitening = current?.whitening ?? setup.whitening
        let (new, perEdit) = try routeKeys(requests, layer: setup.layer, site: setup.site, whitening: whitening)
        let keys = current.map { Tensor.concatenatingRows([$0.keys, new]) } ?? new
        var thresholds = (current?.keyThresholds ?? []) + [Float](repeating: threshold, count: new.shape[0])
        guard let shards else {
            return EditRouter(layer: setup.layer, site: setup.site, threshold: threshold, whitening: whitening, keys: keys,
                              keyThresholds: thresholds)
        }
        // Keys from before shards were recorded belong to shard 0 and to no known edit (−1 is never retired).
        let old = current?.keys.shape[0] ?? 0
        let keyShards = (current?.keyShards ?? []) + zip(perEdit, shards).flatMap { [Int32](repeating: $1, count: $0) }
        let keyEdits = (current?.keyEdits ?? [Int32](repeating: -1, count: old))
            + perEdit.enumerated().flatMap { [Int32](repeating: Int32(editCount + $0.offset), count: $0.element) }
        for (k, e) in keyEdits.enumerated() where retired.contains(Int(e)) { thresholds[k] = Self.retiredThreshold }
        return EditRouter(layer: setup.layer, site: setup.site, threshold: threshold, whitening: whitening, keys: keys,
                          keyThresholds: thresholds, keyShards: keyShards, keyEdits: keyEdits)
    }

    /// The threshold of a retired key: above any cosine.
    static let retiredThreshold: Float = 2
}
