import Foundation

/// Errors of model loading, configuration and use.
public enum LMError: Error, CustomStringConvertible, Equatable, Sendable {
    case unsupportedModelType(String, file: String)
    case invalidConfig(file: String, field: String, reason: String)
    case missingFile(String)
    case missingTensor(name: String, file: String)
    case shapeMismatch(name: String, expected: [Int], found: [Int], file: String)
    case invalidInput(String)

    public var description: String {
        switch self {
        case let .unsupportedModelType(t, file):
            return "\(file): model_type \"\(t)\" is not supported (supported: \(ModelRegistry.supportedTypes.joined(separator: ", ")))"
        case let .invalidConfig(file, field, reason): return "\(file): field \"\(field)\": \(reason)"
        case let .missingFile(path): return "\(path): file not found"
        case let .missingTensor(name, file): return "\(file): tensor \"\(name)\" is missing"
        case let .shapeMismatch(name, expected, found, file):
            return "\(file): tensor \"\(name)\" has shape \(found), the configuration needs \(expected)"
        case let .invalidInput(msg): return msg
        }
    }
}
