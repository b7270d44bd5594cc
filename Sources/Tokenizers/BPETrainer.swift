import Foundation

/// What to train: the target vocabulary size (special tokens and the 256 byte symbols included),
/// the least count a pair needs to be merged, and the special tokens (ids 0, 1, … in this order).
public struct BPETrainingOptions: Sendable, Equatable {
    /// Target vocabulary size; training stops earlier when no pair is frequent enough.
    public var vocabSize: Int
    /// Pairs seen fewer times are never merged (`tokenizers`' `min_frequency`; 0 merges everything).
    public var minFrequency: Int
    /// Special tokens, added first with ids 0, 1, …; the first also serves as bos/eos/unk token.
    public var specialTokens: [String]
    /// `model_max_length` written to tokenizer_config.json.
    public var modelMaxLength: Int

    public init(vocabSize: Int, minFrequency: Int = 0, specialTokens: [String] = ["<|endoftext|>"],
                modelMaxLength: Int = 1024) {
        self.vocabSize = vocabSize
        self.minFrequency = minFrequency
        self.specialTokens = specialTokens
        self.modelMaxLength = modelMaxLength
    }
}

/// One merge rule: the two tokens that become one.
public struct BPEMerge: Sendable, Equatable {
    public let left: String
    public let right: String
}

/// Byte-level BPE training, GPT-2 style, as Hugging Face `tokenizers`' `BpeTrainer` with the
/// `ByteLevel` pre-tokenizer does it.
///
/// The corpus is read line by line (line endings kept), each line is cut with the GPT-2
/// pre-tokenizer regex and words are counted. The alphabet is the 256 byte-level symbols (ids after
/// the special tokens, in code-point order). The most frequent adjacent pair is merged repeatedly;
/// ties go to the pair with the smallest (left id, right id), which is `tokenizers`' order. Pair
/// counts are updated incrementally, touching only the words that contain the merged pair.
public enum BPETrainer {
    /// Trains on the text of a UTF-8 file.
    public static func train(corpus url: URL, options: BPETrainingOptions) throws -> TrainedBPE {
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw TokenizerError.fileNotFound(path: url.path)
        }
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw TokenizerError.unreadableFile(path: url.path, reason: error.localizedDescription)
        }
        return try train(bytes: [UInt8](data), label: url.path, options: options)
    }

    /// Trains on a string.
    public static func train(text: String, options: BPETrainingOptions) throws -> TrainedBPE {
        try train(bytes: Array(text.utf8), label: "<text>", options: options)
    }

    static func train(bytes: [UInt8], label: String, options: BPETrainingOptions) throws -> TrainedBPE {
        let started = Date()
        var specials: [String] = []
        for token in options.specialTokens where !specials.contains(where: { TokenKey($0) == TokenKey(token) }) {
            guard !token.isEmpty else { throw TokenizerError.invalidTrainingOptions(reason: "a special token is empty") }
            specials.append(token)
        }
        let alphabetSize = 256 + specials.count
        guard options.vocabSize >= alphabetSize else {
            throw TokenizerError.invalidTrainingOptions(
                reason: "vocabulary size \(options.vocabSize) is below the \(alphabetSize) ids of the special tokens and the 256 byte symbols")
        }
        guard options.vocabSize <= 1_000_000 else {
            throw TokenizerError.invalidTrainingOptions(reason: "vocabulary size \(options.vocabSize) is above 1,000,000")
        }
        guard options.minFrequency >= 0 else {
            throw TokenizerError.invalidTrainingOptions(reason: "minimum frequency \(options.minFrequency) is negative")
        }
        guard options.modelMaxLength > 0 else {
            throw TokenizerError.invalidTrainingOptions(reason: "model_max_length \(options.modelMaxLength) is not positive")
        }
        guard !bytes.isEmpty else { throw TokenizerError.invalidCorpus(path: label, reason: "the corpus is empty") }
        if let offset = firstInvalidUTF8(bytes) {
            throw TokenizerError.invalidCorpus(path: label, reason: "not valid UTF-8 (byte offset \(offset))")
        }

        // Vocabulary: special tokens, then the byte-level alphabet in code-point order.
        var vocabulary: [String] = []
        var ids: [TokenKey: Int32] = [:]
        func intern(_ token: String) -> Int32 {
            if let id = ids[TokenKey(token)] { return id }
            let id = Int32(vocabulary.count)
            vocabulary.append(token)
            ids[TokenKey(token)] = id
            return id
        }
        for token in specials { _ = intern(token) }
        var symbolForByte = [Int32](repeating: 0, count: 256)
        for byte in (0..<256).sorted(by: { ByteLevelAlphabet.scalarForByte[$0] < ByteLevelAlphabet.scalarForByte[$1] }) {
            symbolForByte[byte] = intern(ByteLevelAlphabet.stringForByte[byte])
        }

        // Count the pre-token words.
        var words: [[Int32]] = []
        var counts: [Int64] = []
        bytes.withUnsafeBufferPointer { buffer in
            var table: [ByteSlice: Int64] = [:]
            let n = buffer.count
            var lineStart = 0
            while lineStart < n {
                var lineEnd = lineStart
                while lineEnd < n, buffer[lineEnd] != 0x0A { lineEnd += 1 }
                if lineEnd < n { lineEnd += 1 }  // keep the "\n", as `tokenizers` does
                let line = UnsafeBufferPointer(rebasing: buffer[lineStart..<lineEnd])
                GPT2PreTokenizerScanner.scan(line) { range in
                    let slice = ByteSlice(base: line.baseAddress! + range.lowerBound, count: range.count)
                    table[slice, default: 0] += 1
                }
                lineStart = lineEnd
            }
            // A deterministic word order (independent of hashing) keeps training reproducible.
            let sorted = table.sorted { lhs, rhs in lhs.key.lexicographicallyPrecedes(rhs.key) }
            words.reserveCapacity(sorted.count)
            counts.reserveCapacity(sorted.count)
            for (slice, count) in sorted {
                words.append(UnsafeBufferPointer(start: slice.base, count: slice.count).map { symbolForByte[Int($0)] })
                counts.append(count)
            }
        }

        // Initial pair counts and the words each pair occurs in.
        var pairCounts: [UInt64: Int64] = [:]
        var pairWords: [UInt64: [Int32]] = [:]
        for (w, word) in words.enumerated() where word.count > 1 {
            for i in 0..<(word.count - 1) {
                let key = BPEModel.pairKey(word[i], word[i + 1])
                pairCounts[key, default: 0] += counts[w]
                pairWords[key, default: []].appendUnlessLast(Int32(w))
            }
        }
        var queue = BinaryHeap<PairCandidate>()
        for (key, count) in pairCounts where count > 0 { queue.push(PairCandidate(count: count, pair: key)) }

        // Merge.
        var merges: [(Int32, Int32)] = []
        var visited = [Int32](repeating: -1, count: words.count)
        var touched: Set<UInt64> = []
        while vocabulary.count < options.vocabSize, let top = queue.pop() {
            let current = pairCounts[top.pair] ?? 0
            if top.count != current {
                if current > 0 { queue.push(PairCandidate(count: current, pair: top.pair)) }
                continue
            }
            if current < 1 || Int64(options.minFrequency) > current { break }
            let left = Int32(truncatingIfNeeded: top.pair >> 32)
            let right = Int32(truncatingIfNeeded: top.pair & 0xFFFF_FFFF)
            let merged = intern(vocabulary[Int(left)] + vocabulary[Int(right)])
            let mergeIndex = Int32(merges.count)
            merges.append((left, right))

            touched.removeAll(keepingCapacity: true)
            for w in pairWords.removeValue(forKey: top.pair) ?? [] where visited[Int(w)] != mergeIndex {
                visited[Int(w)] = mergeIndex
                let count = counts[Int(w)]
                mergePair(in: &words[Int(w)], left: left, right: right, merged: merged) { pair, delta in
                    pairCounts[pair, default: 0] += Int64(delta) * count
                    if delta > 0 {
                        pairWords[pair, default: []].appendUnlessLast(w)
                        touched.insert(pair)
                    }
                }
            }
            pairCounts[top.pair] = 0
            for pair in touched {
                if let count = pairCounts[pair], count > 0 { queue.push(PairCandidate(count: count, pair: pair)) }
            }
        }

        return TrainedBPE(
            vocabulary: vocabulary,
            merges: merges.map { BPEMerge(left: vocabulary[Int($0.0)], right: vocabulary[Int($0.1)]) },
            specialTokens: specials, modelMaxLength: options.modelMaxLength,
            distinctWords: words.count, corpusBytes: bytes.count,
            seconds: Date().timeIntervalSince(started))
    }

    /// Replaces every non-overlapping `left right` (scanning left to right) with `merged` and reports
    /// the pair-count changes, as `tokenizers`' `Word::merge`.
    private static func mergePair(in word: inout [Int32], left: Int32, right: Int32, merged: Int32,
                                  _ change: (UInt64, Int32) -> Void) {
        let n = word.count
        guard n > 1 else { return }
        var read = 0
        var write = 0
        while read < n {
            if read + 1 < n, word[read] == left, word[read + 1] == right {
                if write > 0 {
                    let previous = word[write - 1]
                    change(BPEModel.pairKey(previous, left), -1)
                    change(BPEModel.pairKey(previous, merged), 1)
                }
                if read + 2 < n {
                    let next = word[read + 2]
                    change(BPEModel.pairKey(right, next), -1)
                    change(BPEModel.pairKey(merged, next), 1)
                }
                word[write] = merged
                write += 1
                read += 2
            } else {
                word[write] = word[read]
                write += 1
                read += 1
            }
        }
        if write < n { word.removeLast(n - write) }
    }

    /// The offset of the first byte that is not valid UTF-8, or nil.
    private static func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
        var iterator = bytes.makeIterator()
        var codec = UTF8()
        var offset = 0
        while true {
            switch codec.decode(&iterator) {
            case .scalarValue(let scalar): offset += UTF8.width(scalar)
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }
}

/// A word's bytes inside the corpus buffer (valid only while that buffer is).
private struct ByteSlice: Hashable {
    let base: UnsafePointer<UInt8>
    let count: Int

    static func == (lhs: ByteSlice, rhs: ByteSlice) -> Bool {
        lhs.count == rhs.count && (lhs.base == rhs.base || memcmp(lhs.base, rhs.base, lhs.count) == 0)
    }

    func hash(into hasher: inout Hasher) {
        hasher.combine(bytes: UnsafeRawBufferPointer(start: base, count: count))
    }

    func lexicographicallyPrecedes(_ other: ByteSlice) -> Bool {
        let common = Swift.min(count, other.count)
        let order = common == 0 ? 0 : memcmp(base, other.base, common)
        return order != 0 ? order < 0 : count < other.count
    }
}

/// A pair candidate of the trainer's queue: highest count first, then smallest pair (left id, then right id).
private struct PairCandidate: HeapOrdered {
    let count: Int64
    let pair: UInt64
    @inline(__always) func precedes(_ other: PairCandidate) -> Bool {
        count != other.count ? count > other.count : pair < other.pair
    }
}

private extension Array where Element == Int32 {
    mutating func appendUnlessLast(_ value: Int32) {
        if last != value { append(value) }
    }
}

/// The result of `BPETrainer`: a byte-level BPE vocabulary and its merges, ready to be written as
/// a Hugging Face tokenizer folder.
public struct TrainedBPE: Sendable {
    /// Tokens by id.
    public let vocabulary: [String]
    /// Merge rules by rank.
    public let merges: [BPEMerge]
    /// The special tokens (ids 0, 1, …).
    public let specialTokens: [String]
    /// `model_max_length` for tokenizer_config.json.
    public let modelMaxLength: Int
    /// How many distinct pre-token words the corpus had.
    public let distinctWords: Int
    /// The corpus size in bytes.
    public let corpusBytes: Int
    /// Training time in seconds.
    public let seconds: Double

    /// tokenizer.json in the layout `tokenizers` writes for GPT-2 (byte-level BPE).
    public func tokenizerJSON() -> Data {
        var out = "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": ["
        for (index, token) in specialTokens.enumerated() {
            out += index == 0 ? "\n" : ",\n"
            out += "    {\"id\": \(index), \"content\": \(jsonString(token)), \"single_word\": false, "
                + "\"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}"
        }
        out += specialTokens.isEmpty ? "],\n" : "\n  ],\n"
        out += """
          "normalizer": null,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
          "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
          "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
          "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": {
        """
        out += "\n"
        for (id, token) in vocabulary.enumerated() {
            out += "      \(jsonString(token)): \(id)\(id + 1 < vocabulary.count ? "," : "")\n"
        }
        out += "    },\n    \"merges\": ["
        for (rank, merge) in merges.enumerated() {
            out += rank == 0 ? "\n" : ",\n"
            out += "      [\(jsonString(merge.left)), \(jsonString(merge.right))]"
        }
        out += merges.isEmpty ? "]\n" : "\n    ]\n"
        out += "  }\n}\n"
        return Data(out.utf8)
    }

    /// tokenizer_config.json naming the special tokens (the first is bos, eos and unk).
    public func tokenizerConfigJSON() -> Data {
        var out = "{\n"
        if let first = specialTokens.first {
            out += "  \"add_bos_token\": false,\n"
            out += "  \"add_prefix_space\": false,\n"
            out += "  \"bos_token\": \(jsonString(first)),\n"
            out += "  \"clean_up_tokenization_spaces\": false,\n"
            out += "  \"eos_token\": \(jsonString(first)),\n"
        } else {
            out += "  \"add_prefix_space\": false,\n"
            out += "  \"clean_up_tokenization_spaces\": false,\n"
        }
        out += "  \"errors\": \"replace\",\n"
        out += "  \"model_max_length\": \(modelMaxLength),\n"
        out += "  \"tokenizer_class\": \"GPT2Tokenizer\""
        if let first = specialTokens.first {
            out += ",\n  \"unk_token\": \(jsonString(first))"
        }
        out += "\n}\n"
        return Data(out.utf8)
    }

    /// Writes tokenizer.json and tokenizer_config.json into `folder` (created if needed).
    public func write(to folder: URL) throws {
        do {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        } catch {
            throw TokenizerError.writeFailed(path: folder.path, reason: error.localizedDescription)
        }
        for (name, data) in [("tokenizer.json", tokenizerJSON()), ("tokenizer_config.json", tokenizerConfigJSON())] {
            let url = folder.appendingPathComponent(name)
            do {
                try data.write(to: url, options: .atomic)
            } catch {
                throw TokenizerError.writeFailed(path: url.path, reason: error.localizedDescription)
            }
        }
    }

    /// A tokenizer built from the written JSON (the same bytes `write(to:)` stores).
    public func makeTokenizer() throws -> Tokenizer {
        try Tokenizer(tokenizerJSON: tokenizerJSON(), tokenizerConfig: tokenizerConfigJSON())
    }
}

/// A JSON string literal; non-ASCII characters are written as they are (like serde_json).
func jsonString(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case "\u{08}": out += "\\b"
        case "\u{0C}": out += "\\f"
        default:
            if scalar.value < 0x20 {
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
    }
    return out + "\""
}
