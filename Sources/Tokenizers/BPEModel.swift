import Foundation

/// A BPE model as `tokenizers` runs it: a word is split into characters (Unicode scalars), each
/// looked up in the vocabulary (with byte fallback and unknown-token handling), then merged by
/// rank until no ranked pair is left. Results are cached per word.
final class BPEModel: Sendable {
    /// token → id, compared byte for byte.
    let vocabulary: [TokenKey: Int]
    /// id → token (nil for ids with no token).
    let tokens: [String?]
    /// (left id << 32 | right id) → (rank, merged id).
    private let merges: [UInt64: MergeTarget]
    /// Ids of the one-scalar tokens, used when no prefix/suffix applies.
    private let scalarIDs: [UInt32: Int32]
    /// `<0x00>`..`<0xFF>` ids for byte fallback (-1 when missing), nil when byte fallback is off.
    private let byteFallbackIDs: [Int32]?
    let unknownTokenID: Int?
    let continuingSubwordPrefix: String?
    let endOfWordSuffix: String?
    let fuseUnknown: Bool
    let ignoreMerges: Bool
    private let cache = WordCache(capacity: 262_144)

    struct MergeTarget: Sendable {
        let rank: Int32
        let id: Int32
    }

    /// Words longer than this (in UTF-8 bytes) are not cached, as in `tokenizers`.
    static let maxCachedWordLength = 256

    /// Builds the model from a vocabulary in file order and merges as token pairs; `file` labels errors.
    init(vocabulary entries: [(String, Int)], merges mergePairs: [(String, String)], unknownToken: String?,
         continuingSubwordPrefix: String?, endOfWordSuffix: String?, fuseUnknown: Bool,
         byteFallback: Bool, ignoreMerges: Bool, file: String) throws {
        var vocabulary: [TokenKey: Int] = [:]
        vocabulary.reserveCapacity(entries.count)
        var maxID = -1
        for (token, id) in entries {
            guard id >= 0, id <= Int(Int32.max) else {
                throw TokenizerError.invalidVocabulary(file: file, reason: "token \(debugToken(token)) has id \(id), outside 0...\(Int32.max)")
            }
            vocabulary[TokenKey(token)] = id
            maxID = max(maxID, id)
        }
        guard maxID < 16_777_216 else {
            throw TokenizerError.invalidVocabulary(file: file, reason: "largest id \(maxID) is implausibly large")
        }
        var tokens = [String?](repeating: nil, count: maxID + 1)
        // One token per id; when ids repeat, the first in file order.
        for (token, id) in entries.reversed() { tokens[id] = token }

        var scalarIDs: [UInt32: Int32] = [:]
        for (key, id) in vocabulary {
            var scalars = key.string.unicodeScalars.makeIterator()
            if let first = scalars.next(), scalars.next() == nil { scalarIDs[first.value] = Int32(id) }
        }

        let prefixLength = continuingSubwordPrefix?.utf8.count ?? 0
        var mergeTable: [UInt64: MergeTarget] = [:]
        mergeTable.reserveCapacity(mergePairs.count)
        for (rank, (left, right)) in mergePairs.enumerated() {
            guard let leftID = vocabulary[TokenKey(left)] else {
                throw TokenizerError.invalidMerge(file: file, rank: rank, reason: "token \(debugToken(left)) is not in the vocabulary")
            }
            guard let rightID = vocabulary[TokenKey(right)] else {
                throw TokenizerError.invalidMerge(file: file, rank: rank, reason: "token \(debugToken(right)) is not in the vocabulary")
            }
            var rightPart = Substring(right)
            if prefixLength > 0, let prefix = continuingSubwordPrefix, right.utf8.starts(with: prefix.utf8) {
                rightPart = Substring(String(decoding: right.utf8.dropFirst(prefixLength), as: UTF8.self))
            }
            let merged = left + rightPart
            guard let mergedID = vocabulary[TokenKey(merged)] else {
                throw TokenizerError.invalidMerge(file: file, rank: rank, reason: "merged token \(debugToken(merged)) is not in the vocabulary")
            }
            // Like `tokenizers`, a repeated pair keeps its last rank.
            mergeTable[BPEModel.pairKey(Int32(leftID), Int32(rightID))] = MergeTarget(rank: Int32(rank), id: Int32(mergedID))
        }

        var unknownID: Int?
        if let unknownToken {
            guard let id = vocabulary[TokenKey(unknownToken)] else {
                throw TokenizerError.invalidVocabulary(file: file, reason: "unk_token \(debugToken(unknownToken)) is not in the vocabulary")
            }
            unknownID = id
        }

        var fallback: [Int32]?
        if byteFallback {
            fallback = (0..<256).map { byte in
                let token = byteFallbackToken(UInt8(byte))
                return vocabulary[TokenKey(token)].map(Int32.init) ?? -1
            }
        }

        self.vocabulary = vocabulary
        self.tokens = tokens
        self.merges = mergeTable
        self.scalarIDs = scalarIDs
        self.byteFallbackIDs = fallback
        self.unknownTokenID = unknownID
        self.continuingSubwordPrefix = continuingSubwordPrefix
        self.endOfWordSuffix = endOfWordSuffix
        self.fuseUnknown = fuseUnknown
        self.ignoreMerges = ignoreMerges
    }

    @inline(__always)
    static func pairKey(_ left: Int32, _ right: Int32) -> UInt64 {
        (UInt64(UInt32(bitPattern: left)) << 32) | UInt64(UInt32(bitPattern: right))
    }

    /// The number of ids (largest id + 1).
    var idCount: Int { tokens.count }

    /// Appends the ids of one pre-token to `output`.
    func tokenize(_ word: String, into output: inout [Int]) {
        if word.isEmpty { return }
        if ignoreMerges, let id = vocabulary[TokenKey(word)] {
            output.append(id)
            return
        }
        let cacheable = word.utf8.count < BPEModel.maxCachedWordLength
        let key = TokenKey(word)
        if cacheable, let hit = cache.get(key) {
            for id in hit { output.append(Int(id)) }
            return
        }
        let ids = mergeWord(word)
        if cacheable { cache.set(key, ids) }
        for id in ids { output.append(Int(id)) }
    }

    /// Splits a word into its initial symbols (see `BPE::merge_word` in `tokenizers`).
    private func initialSymbols(_ word: String) -> [Int32] {
        var symbols: [Int32] = []
        symbols.reserveCapacity(word.utf8.count)
        var pendingUnknown = false  // an unknown symbol not yet emitted (for fuse_unk)
        let plain = continuingSubwordPrefix == nil && endOfWordSuffix == nil
        let scalars = Array(word.unicodeScalars)
        for (index, scalar) in scalars.enumerated() {
            var id: Int32?
            var text: String?
            if plain {
                id = scalarIDs[scalar.value]
            } else {
                var s = String(Character(scalar))
                if index > 0, let prefix = continuingSubwordPrefix { s = prefix + s }
                if index == scalars.count - 1, let suffix = endOfWordSuffix { s += suffix }
                id = vocabulary[TokenKey(s)].map(Int32.init)
                text = s
            }
            if let id {
                if pendingUnknown, let unknownTokenID {
                    symbols.append(Int32(unknownTokenID))
                    pendingUnknown = false
                }
                symbols.append(id)
                continue
            }
            if let fallback = byteFallbackIDs {
                let utf8 = Array((text ?? String(Character(scalar))).utf8)
                let ids = utf8.map { fallback[Int($0)] }
                if !ids.contains(-1) {
                    symbols.append(contentsOf: ids)
                    continue
                }
            }
            if let unknownTokenID {
                if pendingUnknown {
                    if !fuseUnknown { symbols.append(Int32(unknownTokenID)) }
                }
                pendingUnknown = true
            }
            // No unk_token: the character is dropped, as in `tokenizers`.
        }
        if pendingUnknown, let unknownTokenID { symbols.append(Int32(unknownTokenID)) }
        return symbols
    }

    /// Merges a word's symbols, lowest rank first and leftmost among equal ranks.
    private func mergeWord(_ word: String) -> [Int32] {
        var symbols = initialSymbols(word)
        let count = symbols.count
        if count < 2 { return symbols }
        var next = [Int32](repeating: -1, count: count)
        var prev = [Int32](repeating: -1, count: count)
        var alive = [Bool](repeating: true, count: count)
        for i in 0..<count {
            next[i] = i + 1 < count ? Int32(i + 1) : -1
            prev[i] = Int32(i - 1)
        }
        var heap = BinaryHeap<MergeCandidate>()
        for i in 0..<(count - 1) {
            if let target = merges[BPEModel.pairKey(symbols[i], symbols[i + 1])] {
                heap.push(.init(rank: target.rank, position: Int32(i), id: target.id))
            }
        }
        while let top = heap.pop() {
            let position = Int(top.position)
            guard alive[position] else { continue }
            let right = Int(next[position])
            guard right >= 0 else { continue }
            guard let target = merges[BPEModel.pairKey(symbols[position], symbols[right])], target.id == top.id else {
                continue  // an expired entry
            }
            symbols[position] = top.id
            alive[right] = false
            let after = Int(next[right])
            next[position] = Int32(after)
            if after >= 0 { prev[after] = Int32(position) }
            let before = Int(prev[position])
            if before >= 0, let target = merges[BPEModel.pairKey(symbols[before], symbols[position])] {
                heap.push(.init(rank: target.rank, position: Int32(before), id: target.id))
            }
            if after >= 0, let target = merges[BPEModel.pairKey(symbols[position], symbols[after])] {
                heap.push(.init(rank: target.rank, position: Int32(position), id: target.id))
            }
        }
        var result: [Int32] = []
        result.reserveCapacity(count)
        var i = 0
        while i >= 0, i < count {
            result.append(symbols[i])
            i = Int(next[i])
        }
        return result
    }
}

/// A merge candidate, ordered by (rank, position): the heap pops the lowest rank, leftmost first.
struct MergeCandidate: HeapOrdered {
    let rank: Int32
    let position: Int32
    let id: Int32
    @inline(__always) func precedes(_ other: MergeCandidate) -> Bool {
        rank != other.rank ? rank < other.rank : position < other.position
    }
}

/// A thread-safe word → ids cache that stops growing at its capacity.
final class WordCache: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [TokenKey: [Int32]] = [:]
    private let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    func get(_ key: TokenKey) -> [Int32]? {
        lock.lock()
        defer { lock.unlock() }
        return storage[key]
    }

    func set(_ key: TokenKey, _ value: [Int32]) {
        lock.lock()
        defer { lock.unlock() }
        if storage.count < capacity { storage[key] = value }
    }
}

/// `<0x0A>` for byte 10: the byte-fallback token spelling.
func byteFallbackToken(_ byte: UInt8) -> String {
    let digits = Array("0123456789ABCDEF")
    return "<0x" + String(digits[Int(byte >> 4)]) + String(digits[Int(byte & 15)]) + ">"
}
