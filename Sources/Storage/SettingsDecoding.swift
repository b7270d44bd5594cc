import Foundation

// Settings files (editor.json, editor.config.json, pretrain.json, …) may leave out any key: a missing key
// keeps its default. Unknown keys are errors, so a misspelt setting is not silently ignored.

/// Any key of a JSON object (to list the keys a settings file holds).
public struct AnyKey: CodingKey {
    public var stringValue: String
    public var intValue: Int? { nil }
    public init?(stringValue: String) { self.stringValue = stringValue }
    public init?(intValue: Int) { nil }
}

/// Throws a `DecodingError` naming the first key of the decoder's object that `K` does not list.
public func rejectUnknownKeys<K: CodingKey & CaseIterable>(_ decoder: Decoder, _: K.Type) throws {
    let known = Set(K.allCases.map(\.stringValue))
    let c = try decoder.container(keyedBy: AnyKey.self)
    if let bad = c.allKeys.first(where: { !known.contains($0.stringValue) }) {
        throw DecodingError.dataCorruptedError(forKey: bad, in: c, debugDescription: "unknown setting \"\(bad.stringValue)\"")
    }
}

extension KeyedDecodingContainer {
    /// The key's value, or `fallback` when the object does not hold the key.
    public func value<T: Decodable>(_ key: Key, _ fallback: T) throws -> T { try decodeIfPresent(T.self, forKey: key) ?? fallback }
}
