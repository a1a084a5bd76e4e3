import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// JSON response bodies; errors always carry a human-readable message.
enum JSONResponse {
    struct Problem: Encodable {
        var error: String
        var message: String
        var delivery_id: Int64?
    }

    static func make(_ status: HTTPResponse.Status, _ value: some Encodable, headers: HTTPFields = [:]) -> Response {
        let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
        var fields = headers
        fields[.contentType] = "application/json; charset=utf-8"
        return Response(status: status, headers: fields, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func problem(
        _ status: HTTPResponse.Status, _ error: String, _ message: String,
        deliveryID: Int64? = nil, headers: HTTPFields = [:]
    ) -> Response {
        make(status, Problem(error: error, message: message, delivery_id: deliveryID), headers: headers)
    }

    static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()
}
