import Foundation
import Storage

/// An error in a batch file: the file, the 1-based line, the field and what is wrong.
public struct BatchError: Error, CustomStringConvertible, Equatable, Sendable, Codable {
    public var file: String
    public var line: Int
    public var field: String
    public var reason: String

    public init(file: String, line: Int, field: String, reason: String) {
        self.file = file; self.line = line; self.field = field; self.reason = reason
    }

    public var description: String {
        line > 0 ? "\(file):\(line): field \"\(field)\": \(reason)" : "\(file): \(reason)"
    }
}

/// Reads JSON Lines of edits in the flat CounterFact/EasyEdit layout (`prompt`, `target_new` required;
/// `subject`, `ground_truth`, `rephrase_prompt` as a string or list, `locality_prompt` +
/// `locality_ground_truth` or a list of `{prompt, ground_truth}`, `case_id`), with EasyEdit's ZsRE names
/// (`src`, `alt`, `rephrase`, `loc`, `loc_ans`) as aliases. The whole file is validated before anything
/// is returned: the first problem is thrown with its line and field.
public enum EditBatch {
    /// Longest accepted prompt or target, in characters.
    public static let maxTextLength = 2000

    public static func parse(_ data: Data, file: String, requireFinalNewline: Bool = false) throws -> [EditRequest] {
        try parseNumbered(data, file: file, requireFinalNewline: requireFinalNewline).map(\.request)
    }

    /// `parse`, keeping each request's 1-based line number (for errors found later, such as a prompt
    /// too long for the model's context).
    public static func parseNumbered(_ data: Data, file: String, requireFinalNewline: Bool = false) throws
        -> [(line: Int, request: EditRequest)] {
        guard !data.isEmpty else { throw BatchError(file: file, line: 0, field: "", reason: "the file is empty") }
        if requireFinalNewline && data.last != UInt8(ascii: "\n") {
            throw BatchError(file: file, line: 0, field: "", reason: "the file does not end with a newline (a writer that stopped mid-line?)")
        }
        var out: [(line: Int, request: EditRequest)] = []
        var lineNo = 0
        for raw in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNo += 1
            var bytes = Data(raw)
            if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
            if bytes.allSatisfy({ $0 == 32 || $0 == 9 }) { continue }
            guard String(data: bytes, encoding: .utf8) != nil else {
                throw BatchError(file: file, line: lineNo, field: "", reason: "not valid UTF-8")
            }
            let obj: Any
            do { obj = try JSONSerialization.jsonObject(with: bytes, options: [.fragmentsAllowed]) } catch {
                throw BatchError(file: file, line: lineNo, field: "", reason: "invalid JSON")
            }
            guard let o = obj as? [String: Any] else {
                throw BatchError(file: file, line: lineNo, field: "", reason: "a line must be a JSON object")
            }
            if let key = duplicateKey(bytes) {
                throw BatchError(file: file, line: lineNo, field: key, reason: "appears twice in one object (which one is meant?)")
            }
            // The values as written (integers stay integers, booleans stay booleans).
            guard let all = try? JSONDecoder().decode([String: JSONValue].self, from: bytes) else {
                throw BatchError(file: file, line: lineNo, field: "", reason: "invalid JSON")
            }
            var r = try request(o, typed: all, file: file, line: lineNo)
            r.extra = all.filter { !EditRequest.knownFields.contains($0.key) }
            out.append((lineNo, r))
        }
        guard !out.isEmpty else { throw BatchError(file: file, line: 0, field: "", reason: "the file holds no edits") }
        return out
    }

    /// The first key that occurs twice in one object of a valid JSON text (at any depth), if any:
    /// JSON parsers keep the last one silently.
    static func duplicateKey(_ bytes: Data) -> String? {
        let quote = UInt8(ascii: "\""), backslash = UInt8(ascii: "\\")
        var objects: [Set<String>?] = []  // nil for an array
        var expectKey = false
        var i = bytes.startIndex
        while i < bytes.endIndex {
            switch bytes[i] {
            case UInt8(ascii: "{"): objects.append([]); expectKey = true
            case UInt8(ascii: "["): objects.append(nil); expectKey = false
            case UInt8(ascii: "}"), UInt8(ascii: "]"): objects.removeLast(); expectKey = false
            case UInt8(ascii: ","): expectKey = objects.last.map { $0 != nil } ?? false
            case quote:
                let start = i
                i += 1
                while i < bytes.endIndex && bytes[i] != quote { i += bytes[i] == backslash ? 2 : 1 }
                if expectKey, let last = objects.last, var keys = last, i < bytes.endIndex,
                   let key = (try? JSONSerialization.jsonObject(with: bytes[start...i], options: [.fragmentsAllowed])) as? String {
                    if !keys.insert(key).inserted { return key }
                    objects[objects.count - 1] = keys
                }
                expectKey = false
            default: break
            }
            i += 1
        }
        return nil
    }

    static func request(_ o: [String: Any], typed: [String: JSONValue], file: String, line: Int) throws -> EditRequest {
        func fail(_ field: String, _ reason: String) -> BatchError { BatchError(file: file, line: line, field: field, reason: reason) }
        func checked(_ s: String, _ field: String) throws -> String {
            if s.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty { throw fail(field, "must not be empty") }
            if s.count > maxTextLength { throw fail(field, "longer than \(maxTextLength) characters") }
            return s
        }
        func text(_ keys: [String], required: Bool) throws -> String? {
            guard let key = keys.first(where: { o[$0] != nil && !(o[$0] is NSNull) }) else {
                if required { throw fail(keys[0], "required but missing") }
                return nil
            }
            guard let s = o[key] as? String else { throw fail(key, "must be a string") }
            let t = s.trimmingCharacters(in: .whitespacesAndNewlines)
            if t.isEmpty { throw fail(key, "must not be empty") }
            if s.count > maxTextLength { throw fail(key, "longer than \(maxTextLength) characters") }
            return s
        }
        let prompt = try text(["prompt", "src"], required: true)!
        let target = try text(["target_new", "alt"], required: true)!
        var rephrases: [String] = []
        for key in ["rephrase_prompt", "rephrase"] {
            guard let v = o[key], !(v is NSNull) else { continue }
            if let s = v as? String { rephrases.append(try checked(s, key)) }
            else if let a = v as? [Any] {
                for (i, e) in a.enumerated() {
                    guard let s = e as? String, !s.isEmpty else { throw fail("\(key)[\(i)]", "must be a non-empty string") }
                    rephrases.append(try checked(s, "\(key)[\(i)]"))
                }
            } else { throw fail(key, "must be a string or a list of strings") }
            break
        }
        var locality: [EditRequest.LocalityPair] = []
        if let v = o["locality"], !(v is NSNull) {
            guard let a = v as? [Any] else { throw fail("locality", "must be a list of {prompt, ground_truth}") }
            for (i, e) in a.enumerated() {
                guard let d = e as? [String: Any], let p = d["prompt"] as? String, let g = d["ground_truth"] as? String,
                      !p.isEmpty, !g.isEmpty else {
                    throw fail("locality[\(i)]", "must be an object with non-empty prompt and ground_truth strings")
                }
                locality.append(.init(prompt: try checked(p, "locality[\(i)].prompt"),
                                      groundTruth: try checked(g, "locality[\(i)].ground_truth")))
            }
        }
        let lp = try text(["locality_prompt", "loc"], required: false)
        let lg = try text(["locality_ground_truth", "loc_ans"], required: false)
        switch (lp, lg) {
        case let (p?, g?): locality.append(.init(prompt: p, groundTruth: g))
        case (nil, nil): break
        case (nil, _): throw fail("locality_prompt", "required with locality_ground_truth")
        case (_, nil): throw fail("locality_ground_truth", "required with locality_prompt")
        }
        var caseId: String?
        switch typed["case_id"] {
        case nil, .null?: break
        case .int(let i)?: caseId = String(i)
        case .string(let s)?: caseId = s
        default: throw fail("case_id", "must be an integer or a string")
        }
        return EditRequest(prompt: prompt, targetNew: target, subject: try text(["subject"], required: false),
                           groundTruth: try text(["ground_truth"], required: false), rephrases: rephrases,
                           locality: locality, caseId: caseId)
    }

    /// One batch line for `request` (the flat layout, sorted keys, unknown fields kept), without the newline.
    public static func line(_ request: EditRequest) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(request)
    }

    /// A whole batch file: one line per request, each ending with a newline.
    public static func encode(_ requests: [EditRequest]) throws -> Data {
        var out = Data()
        for r in requests {
            out.append(try line(r))
            out.append(UInt8(ascii: "\n"))
        }
        return out
    }

    public static func read(_ url: URL, requireFinalNewline: Bool = false) throws -> [EditRequest] {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw BatchError(file: url.path, line: 0, field: "", reason: "cannot read the file")
        }
        return try parse(data, file: url.lastPathComponent, requireFinalNewline: requireFinalNewline)
    }
}
