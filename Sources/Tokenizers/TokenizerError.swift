import Foundation

/// Everything that can go wrong while loading, training or writing a tokenizer.
///
/// Each case names the file (or the label given for in-memory data) and, where it applies, the
/// JSON field (`model.merges[12]`), so that a message alone tells the user what to fix.
public enum TokenizerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A required file does not exist.
    case fileNotFound(path: String)
    /// A file exists but could not be read.
    case unreadableFile(path: String, reason: String)
    /// The JSON is not well formed, or a field has the wrong type or an invalid value.
    case malformedJSON(file: String, field: String, reason: String)
    /// A required field is absent.
    case missingField(file: String, field: String)
    /// A stage (`normalizer`, `pre_tokenizer`, `model`, `post_processor`, `decoder`) names a
    /// `type` this package does not implement.
    case unsupported(file: String, stage: String, type: String)
    /// The vocabulary is unusable (negative or huge ids, an unknown `unk_token`, ...).
    case invalidVocabulary(file: String, reason: String)
    /// A merge rule is malformed or refers to a token that is not in the vocabulary.
    case invalidMerge(file: String, rank: Int, reason: String)
    /// The training corpus is unusable (not UTF-8, empty, ...).
    case invalidCorpus(path: String, reason: String)
    /// Training options that cannot produce a tokenizer (vocabulary too small, ...).
    case invalidTrainingOptions(reason: String)
    /// Writing an output file failed.
    case writeFailed(path: String, reason: String)

    public var description: String {
        switch self {
        case .fileNotFound(let path):
            return "file not found: \(path)"
        case .unreadableFile(let path, let reason):
            return "cannot read \(path): \(reason)"
        case .malformedJSON(let file, let field, let reason):
            return "\(file): malformed JSON at \(field.isEmpty ? "top level" : field): \(reason)"
        case .missingField(let file, let field):
            return "\(file): missing required field \(field)"
        case .unsupported(let file, let stage, let type):
            return "\(file): unsupported \(stage) type \"\(type)\""
        case .invalidVocabulary(let file, let reason):
            return "\(file): invalid vocabulary: \(reason)"
        case .invalidMerge(let file, let rank, let reason):
            return "\(file): invalid merge #\(rank): \(reason)"
        case .invalidCorpus(let path, let reason):
            return "invalid corpus \(path): \(reason)"
        case .invalidTrainingOptions(let reason):
            return "invalid tokenizer training options: \(reason)"
        case .writeFailed(let path, let reason):
            return "cannot write \(path): \(reason)"
        }
    }
}

/// An error raised while decoding a stage, before the file name is known; rewrapped by the loader.
struct StageError: Error {
    enum Kind {
        case unsupported(stage: String, type: String)
        case invalid(reason: String)
    }
    let kind: Kind
    let path: [CodingKey]

    func tokenizerError(file: String) -> TokenizerError {
        switch kind {
        case .unsupported(let stage, let type):
            return .unsupported(file: file, stage: stage, type: type)
        case .invalid(let reason):
            return .malformedJSON(file: file, field: codingPathString(path), reason: reason)
        }
    }
}

/// `model.merges[3]` from a coding path.
func codingPathString(_ path: [CodingKey]) -> String {
    var out = ""
    for key in path {
        if let index = key.intValue {
            out += "[\(index)]"
        } else {
            if !out.isEmpty { out += "." }
            out += key.stringValue
        }
    }
    return out
}

/// Decodes `type` from `data`, mapping every failure to a `TokenizerError` naming `file`.
func decodeJSON<T: Decodable>(_ type: T.Type, from data: Data, file: String) throws -> T {
    do {
        return try JSONDecoder().decode(type, from: data)
    } catch let error as StageError {
        throw error.tokenizerError(file: file)
    } catch let error as TokenizerError {
        throw error
    } catch let error as DecodingError {
        throw tokenizerError(from: error, file: file)
    } catch {
        throw TokenizerError.malformedJSON(file: file, field: "", reason: "\(error)")
    }
}

func tokenizerError(from error: DecodingError, file: String) -> TokenizerError {
    switch error {
    case .keyNotFound(let key, let context):
        return .missingField(file: file, field: codingPathString(context.codingPath + [key]))
    case .typeMismatch(let type, let context):
        return .malformedJSON(file: file, field: codingPathString(context.codingPath),
                              reason: "expected \(jsonTypeName(type))")
    case .valueNotFound(let type, let context):
        return .malformedJSON(file: file, field: codingPathString(context.codingPath),
                              reason: "expected \(jsonTypeName(type)), found null")
    case .dataCorrupted(let context):
        var reason = context.debugDescription
        if let underlying = context.underlyingError {
            reason += " (\(underlying.localizedDescription))"
        }
        return .malformedJSON(file: file, field: codingPathString(context.codingPath), reason: reason)
    @unknown default:
        return .malformedJSON(file: file, field: "", reason: "\(error)")
    }
}

private func jsonTypeName(_ type: Any.Type) -> String {
    switch type {
    case is String.Type: return "a string"
    case is Int.Type, is Int32.Type, is UInt32.Type, is Int64.Type: return "an integer"
    case is Double.Type, is Float.Type: return "a number"
    case is Bool.Type: return "a boolean"
    default:
        let name = "\(type)"
        if name.hasPrefix("Array") { return "an array" }
        if name.hasPrefix("Dictionary") { return "an object" }
        return "a value of type \(name)"
    }
}

/// A coding key for arbitrary object keys.
struct AnyCodingKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(stringValue: String) { self.stringValue = stringValue; self.intValue = nil }
    init?(intValue: Int) { self.stringValue = "\(intValue)"; self.intValue = intValue }
}
